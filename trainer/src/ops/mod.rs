//! Fused CPU kernels with their gradients: the log-probabilities over the
//! vocabulary (`[N, V]`) and the decoder's elementwise layers (RMSNorm, RoPE
//! with the split into heads, SwiGLU's gate). Attention, the decoder's and
//! the vision tower's, is one kernel of its own ([`crate::attention`]).
//!
//! Cross-entropy never materializes the log-probabilities: forward keeps
//! the per-row loss, backward writes `softmax - one_hot`. RMSNorm (six
//! plain ops forward), RoPE (a transpose copy and nine ops) and
//! `silu(gate) * up` (two) are each one pass forward and one backward; the
//! backward passes that yield two gradients write both in that pass.
//!
//! Other devices (CUDA) take the plain-op path, which computes the same
//! function; the tests check the two against each other. Half-precision
//! inputs are computed in f32 and handed back in their type (the loss stays
//! f32), as PyTorch's autocast keeps norms, softmaxes and losses in f32.

use std::sync::Arc;

use candle_core::{CpuStorage, D, DType, Layout, Result, Tensor, bail};

mod adam;
mod cross_entropy;
mod rms_norm;
mod rope;
mod swiglu;

pub use adam::{AdamStep, Moment};
use cross_entropy::CrossEntropy;
use rms_norm::RmsNorm;
use rope::RopeHeads;
use swiglu::SwiGlu;

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return rms_norm(&f32(x)?, &f32(w)?, eps)?.to_dtype(x.dtype());
    }
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    plain_rms_norm(x, w, eps)
}

/// SwiGLU's gate: `silu(gate) * up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return swiglu(&f32(gate)?, &f32(up)?)?.to_dtype(gate.dtype());
    }
    if gate.device().is_cpu() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

/// Rotary position embedding tables: cos and sin of each position's angles,
/// `[T, dh / 2]` row-major.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

/// Splits `x` `[T, n * dh]` (a projection's output) into `n` heads
/// `[n, T, dh]` and rotates each by its position (RoPE in Hugging Face's
/// "rotate half" layout): one pass instead of a transpose copy and the
/// nine ops of the rotation, forward and backward.
pub fn rope_heads(x: &Tensor, n: usize, rope: &Arc<Rope>) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        return rope_heads(&x.to_dtype(DType::F32)?, n, rope)?.to_dtype(x.dtype());
    }
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(RopeHeads {
            heads: n,
            rope: rope.clone(),
            inverse: false,
        });
    }
    plain_rope_heads(x, n, rope)
}

/// Per-row negative log-likelihood of `targets` (u32, `[N]`) under `logits`
/// (`[N, V]`): `logsumexp(row) - row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dtype() != DType::F32 {
        // The loss stays in f32.
        return cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    if logits.device().is_cpu() {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    plain_cross_entropy(logits, targets)
}

// What the fused kernels compute, from plain ops: the path of other devices,
// and the tests' reference.

fn plain_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(w)
}

fn plain_rope_heads(x: &Tensor, n: usize, rope: &Rope) -> Result<Tensor> {
    let (t, width) = x.dims2()?;
    let half = rope.half;
    let x = x
        .reshape((t, n, width / n))?
        .transpose(0, 1)?
        .contiguous()?;
    let cos = Tensor::from_slice(&rope.cos, (t, half), x.device())?;
    let sin = Tensor::from_slice(&rope.sin, (t, half), x.device())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

fn plain_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

pub(crate) fn plain_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The element range of a contiguous layout.
fn contiguous(layout: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bail!("{what}: contiguous tensor expected"),
    }
}

pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: f32 expected")
    };
    Ok(&data[contiguous(layout, what)?])
}

pub(crate) fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: f32 expected")
    };
    Ok(&mut data[contiguous(layout, what)?])
}

/// Elements per parallel task of the elementwise kernels (SwiGLU, AdamW).
const CHUNK: usize = 1 << 14;

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Var};

    use super::*;

    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let z = lvpipe_pipeline::splitmix(seed.wrapping_mul(1_000_003) + i);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cross_entropy_and_its_gradient_match_log_softmax_and_gather() {
        let logits = Var::from_tensor(&random(&[4, 11], 5)).unwrap();
        let targets = Tensor::new(&[3u32, 0, 10, 7], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 0.5, 2.0, 0.0], &Device::Cpu).unwrap();
        let fused = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let plain = plain_cross_entropy(logits.as_tensor(), &targets).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&logits).unwrap(), gp.get(&logits).unwrap()) < 1e-6);
    }
    /// Gradients of `sum(f(inputs) * w)` with respect to each input.
    fn grads_of(inputs: &[&Var], y: &Tensor, w: &Tensor) -> Vec<Tensor> {
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        inputs
            .iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .collect()
    }

    #[test]
    fn rms_norm_and_its_gradients_match_the_plain_ops() {
        // More rows than one parallel block, so the dw reduction is tested.
        let x = Var::from_tensor(&random(&[2, 40, 6], 6)).unwrap();
        let w = Var::from_tensor(&random(&[6], 7)).unwrap();
        let up = random(&[2, 40, 6], 8);
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let plain = plain_rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = grads_of(&[&x, &w], &fused, &up);
        let gp = grads_of(&[&x, &w], &plain, &up);
        for (f, p) in gf.iter().zip(&gp) {
            assert_eq!(f.dims(), p.dims());
            assert!(max_diff(f, p) < 1e-4, "{}", max_diff(f, p));
        }
    }

    #[test]
    fn swiglu_and_its_gradients_match_silu_times_up() {
        let a = Var::from_tensor(&random(&[5, 9], 9)).unwrap();
        let b = Var::from_tensor(&random(&[5, 9], 10)).unwrap();
        let w = random(&[5, 9], 11);
        let fused = swiglu(a.as_tensor(), b.as_tensor()).unwrap();
        let plain = (a.as_tensor().silu().unwrap() * b.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = grads_of(&[&a, &b], &fused, &w);
        let gp = grads_of(&[&a, &b], &plain, &w);
        for (f, p) in gf.iter().zip(&gp) {
            assert!(max_diff(f, p) < 1e-4, "{}", max_diff(f, p));
        }
    }

    #[test]
    fn rope_heads_and_its_gradient_match_transpose_and_rotate() {
        // 3 positions (restarting, as in a packed row), 2 heads of 4.
        let (t, n, half) = (3, 2, 2);
        let angles = [0.0f32, 0.0, 1.0, 0.01, 0.0, 0.0];
        let rope = Arc::new(Rope {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            half,
        });
        let x = Var::from_tensor(&random(&[t, n * 2 * half], 12)).unwrap();
        let w = random(&[n, t, 2 * half], 13);
        let fused = rope_heads(x.as_tensor(), n, &rope).unwrap();
        let plain = plain_rope_heads(x.as_tensor(), n, &rope).unwrap();
        assert_eq!(fused.dims(), &[n, t, 2 * half]);
        assert!(max_diff(&fused, &plain) < 1e-6);
        // Position 0 has angle 0: head 1 there is x's second half-row as is.
        let head1 = fused
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let row0 = x.as_tensor().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(head1, row0[4..]);
        let gf = grads_of(&[&x], &fused, &w);
        let gp = grads_of(&[&x], &plain, &w);
        assert!(max_diff(&gf[0], &gp[0]) < 1e-6);
    }
}
