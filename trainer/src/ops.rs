//! Fused CPU kernels for the two widest tensors of a step, with their
//! gradients: the attention probabilities (`[heads, T, T]`) and the
//! log-probabilities over the vocabulary (`[N, V]`).
//!
//! Built from plain tensor ops, a block-causal softmax is an additive
//! `[T, T]` mask, a broadcast add, max, subtract, exp, sum and divide: seven
//! passes over the scores forward and as many tensors kept for backward. Here
//! it is one pass forward, keeping only the probabilities, and one pass
//! backward. Cross-entropy likewise never materializes the log-probabilities:
//! forward keeps the per-row loss, backward writes `softmax - one_hot`.
//!
//! Other devices (CUDA) take the plain-op path, which computes the same
//! function; the tests check the two against each other.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Softmax over the last dimension of `[.., T, T]` attention scores where
/// query `q` sees keys `starts[q] ..= q` (its own sample, causally); other
/// entries are exactly zero.
pub fn block_causal_softmax(scores: &Tensor, starts: &Arc<Vec<u32>>) -> Result<Tensor> {
    if scores.device().is_cpu() {
        return scores.contiguous()?.apply_op1(BlockCausalSoftmax {
            starts: starts.clone(),
        });
    }
    plain_block_causal_softmax(scores, starts)
}

/// Softmax over the last dimension (the vision tower's full attention).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(FullSoftmax);
    }
    plain_softmax(x)
}

/// Per-row negative log-likelihood of `targets` (u32, `[N]`) under `logits`
/// (`[N, V]`): `logsumexp(row) - row[target]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    plain_cross_entropy(logits, targets)
}

/// What the fused kernels compute, from plain ops: the path of other
/// devices, and the tests' reference.
fn plain_block_causal_softmax(scores: &Tensor, starts: &[u32]) -> Result<Tensor> {
    let t = starts.len();
    let mut mask = vec![-1e9f32; t * t];
    for (q, &s) in starts.iter().enumerate() {
        mask[q * t + s as usize..=q * t + q].fill(0.0);
    }
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
    plain_softmax(&scores.broadcast_add(&mask)?)
}

fn plain_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

fn plain_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: f32 expected")
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: contiguous input expected"),
    }
}

/// Softmax of `row` over `keys`, written to `out` (zero elsewhere).
fn softmax_row(row: &[f32], out: &mut [f32], keys: std::ops::RangeInclusive<usize>) {
    out.fill(0.0);
    let (lo, hi) = (*keys.start(), *keys.end());
    let src = &row[lo..=hi];
    let dst = &mut out[lo..=hi];
    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (s - max).exp();
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// `dx = y * (g - sum(g * y))` per row, over the visible keys only.
fn softmax_grad_row(y: &[f32], g: &[f32], dx: &mut [f32], keys: std::ops::RangeInclusive<usize>) {
    dx.fill(0.0);
    let (lo, hi) = (*keys.start(), *keys.end());
    let (y, g) = (&y[lo..=hi], &g[lo..=hi]);
    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
    for ((d, &yv), &gv) in dx[lo..=hi].iter_mut().zip(y).zip(g) {
        *d = yv * (gv - dot);
    }
}

/// Which keys query row `r` (of `t` per matrix) sees.
fn visible(starts: Option<&[u32]>, t: usize, r: usize) -> std::ops::RangeInclusive<usize> {
    let q = r % t;
    match starts {
        Some(s) => s[q] as usize..=q,
        None => 0..=t - 1,
    }
}

fn softmax_fwd(
    storage: &CpuStorage,
    layout: &Layout,
    starts: Option<&[u32]>,
) -> Result<(CpuStorage, Shape)> {
    let x = f32_slice(storage, layout, "softmax")?;
    let t = layout.dims()[layout.dims().len() - 1];
    if let Some(s) = starts
        && s.len() != t
    {
        bail!("block-causal softmax: {} starts for {t} positions", s.len())
    }
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .enumerate()
        .for_each(|(r, (out, row))| softmax_row(row, out, visible(starts, t, r)));
    Ok((CpuStorage::F32(y), layout.shape().clone()))
}

fn softmax_bwd(y: &Tensor, g: &Tensor, starts: Option<Arc<Vec<u32>>>) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { starts })
}

struct BlockCausalSoftmax {
    starts: Arc<Vec<u32>>,
}

impl CustomOp1 for BlockCausalSoftmax {
    fn name(&self) -> &'static str {
        "block-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        softmax_fwd(storage, layout, Some(&self.starts))
    }

    fn bwd(&self, _: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        softmax_bwd(res, grad_res, Some(self.starts.clone())).map(Some)
    }
}

struct FullSoftmax;

impl CustomOp1 for FullSoftmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        softmax_fwd(storage, layout, None)
    }

    fn bwd(&self, _: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        softmax_bwd(res, grad_res, None).map(Some)
    }
}

struct SoftmaxGrad {
    starts: Option<Arc<Vec<u32>>>,
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
        let starts = self.starts.as_deref().map(Vec::as_slice);
        let mut dx = vec![0.0f32; y.len()];
        dx.par_chunks_mut(t)
            .zip(y.par_chunks(t).zip(g.par_chunks(t)))
            .enumerate()
            .for_each(|(r, (d, (y, g)))| softmax_grad_row(y, g, d, visible(starts, t, r)));
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

struct CrossEntropy;

fn targets_of<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        bail!("cross-entropy targets: u32 expected")
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("cross-entropy targets: contiguous input expected"),
    }
}

/// The `[N, V]` logits, the `N` targets and `V`.
fn logits_and_targets<'a>(
    ls: &'a CpuStorage,
    ll: &Layout,
    ts: &'a CpuStorage,
    tl: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize)> {
    let logits = f32_slice(ls, ll, "cross-entropy logits")?;
    let targets = targets_of(ts, tl)?;
    let (n, v) = ll.shape().dims2()?;
    if targets.len() != n {
        bail!("cross-entropy: {} targets for {n} rows", targets.len())
    }
    Ok((logits, targets, v))
}

/// `log sum exp(row)`, computed from the row's maximum.
fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, v) = logits_and_targets(ls, ll, ts, tl)?;
        let n = targets.len();
        let nll: Vec<f32> = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| logsumexp(row) - row[t as usize])
            .collect();
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dl = logits.apply_op2_no_bwd(
            targets,
            &CrossEntropyGrad {
                grad: grad_res.contiguous()?,
            },
        )?;
        Ok((Some(dl), None))
    }
}

/// `(softmax(row) - one_hot(target)) * g[row]`.
struct CrossEntropyGrad {
    grad: Tensor,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, v) = logits_and_targets(ls, ll, ts, tl)?;
        let g = self.grad.to_vec1::<f32>()?;
        let mut dl = vec![0.0f32; logits.len()];
        dl.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter().zip(g.par_iter()))
            .for_each(|((d, row), (&t, &g))| {
                let lse = logsumexp(row);
                for (d, &x) in d.iter_mut().zip(row) {
                    *d = (x - lse).exp() * g;
                }
                d[t as usize] -= g;
            });
        Ok((CpuStorage::F32(dl), ll.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let z = lvpipe_pipeline::splitmix(seed.wrapping_mul(1_000_003) + i);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
    fn block_causal_softmax_and_its_gradient_match_the_masked_plain_ops() {
        // Two samples packed in a row of 7: positions 0-3 and 4-6.
        let starts = Arc::new(vec![0, 0, 0, 0, 4, 4, 4]);
        let x = Var::from_tensor(&random(&[3, 7, 7], 1)).unwrap();
        let w = random(&[3, 7, 7], 2);
        let fused = block_causal_softmax(x.as_tensor(), &starts).unwrap();
        let plain = plain_block_causal_softmax(x.as_tensor(), &starts).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        // Masked entries are exactly zero: nothing leaks across samples.
        let row4 = fused
            .get(0)
            .unwrap()
            .get(4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&row4[..4], &[0.0; 4]);
        assert_eq!(&row4[5..], &[0.0; 2]);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gp) = (gf.get(&x).unwrap(), gp.get(&x).unwrap());
        assert!(max_diff(gf, gp) < 1e-6, "{}", max_diff(gf, gp));
    }

    #[test]
    fn full_softmax_and_its_gradient_match_the_plain_ops() {
        let x = Var::from_tensor(&random(&[2, 5, 5], 3)).unwrap();
        let w = random(&[2, 5, 5], 4);
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let plain = plain_softmax(x.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-6);
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
}
