//! Cross-entropy over the vocabulary without materializing the
//! log-probabilities: forward keeps the per-row loss, backward writes
//! `softmax - one_hot`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::*;

pub(super) struct CrossEntropy;

pub(super) fn targets_of<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        bail!("cross-entropy targets: u32 expected")
    };
    Ok(&data[contiguous(layout, "cross-entropy targets")?])
}

/// The `[N, V]` logits, the `N` targets and `V`.
pub(super) fn logits_and_targets<'a>(
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
pub(super) fn logsumexp(row: &[f32]) -> f32 {
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
pub(super) struct CrossEntropyGrad {
    pub(super) grad: Tensor,
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
