//! Attention as one CPU kernel whose memory is linear in the sequence, and
//! which computes only the blocks of `[T, T]` a query can see.
//!
//! In a packed row, query `q` sees keys `starts[q]..ends[q]` ([`Visible`]):
//! its own sample, causally in the decoder (`starts[q] ..= q`), whole in the
//! vision tower (each image's patches see all of that image's). Scores,
//! softmax and `P V` as three tensor ops compute all
//! `T * T` scores, most of them then masked, and keep them for the backward
//! pass: half of them for one long sample, nine in ten for a row of 100-token
//! SFT samples. Here the queries go in blocks of [`BLOCK`] rows; a block
//! multiplies only against the keys from its first query's sample start to
//! its last query, [`KEYS`] keys at a time, with an online softmax (a running
//! maximum and sum per query, as FlashAttention does). The forward pass keeps
//! only each query's log-sum-exp; the backward pass recomputes each block's
//! probabilities from it. Memory beyond the inputs and output is one block's
//! scores per thread and one number per query and head.
//!
//! Other devices (CUDA) take the plain-op path, which computes the same
//! function; the tests check the two against each other.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::ops::{f32_slice, plain_softmax};

/// Query rows per block: small enough to skip most masked keys, large
/// enough for the matrix products to run at speed.
const BLOCK: usize = 64;

/// Keys per step of a block's online softmax: the scores a thread holds at
/// once are `BLOCK x KEYS`.
const KEYS: usize = 512;

/// Up to this many bytes of probabilities (all heads of one call), the
/// forward pass keeps them and the backward pass uses them instead of
/// recomputing them: short rows skip the extra `Q K^T` (7% of a step at
/// 2,048 and 8,192 tokens, `lvpipe bench-memory`), long ones stay linear.
/// 2,048 tokens with the tiny recipe's 4 heads keep 35 MB.
pub(crate) const KEEP_BYTES: usize = 64 << 20;

/// The keys each position of a packed row sees: query `q` sees keys
/// `starts[q]..ends[q]`, where both never decrease along the row.
#[derive(Debug, Clone, PartialEq)]
pub struct Visible {
    starts: Vec<u32>,
    ends: Vec<u32>,
}

impl Visible {
    /// Samples attended causally: query `q` sees `starts[q] ..= q`, where
    /// `starts[q]` is the first position of its sample.
    pub fn causal(starts: Vec<u32>) -> Self {
        let ends = (1..=starts.len() as u32).collect();
        Visible { starts, ends }
    }

    /// Samples attended whole: query `q` sees every position of its sample
    /// (those with its `starts[q]`).
    pub fn bidirectional(starts: Vec<u32>) -> Self {
        let t = starts.len();
        let mut ends = vec![t as u32; t];
        for q in (0..t.saturating_sub(1)).rev() {
            ends[q] = match starts[q + 1] != starts[q] {
                true => q as u32 + 1,
                false => ends[q + 1],
            };
        }
        Visible { starts, ends }
    }

    /// Positions in the row.
    pub fn positions(&self) -> usize {
        self.starts.len()
    }

    /// The keys query `q` sees.
    pub(crate) fn span(&self, q: usize) -> std::ops::Range<usize> {
        self.starts[q] as usize..self.ends[q] as usize
    }
}

/// Attention of `q` `[kv, group * T, dh]` (the `group` query heads of each
/// KV head stacked, as Qwen2 orders them) over `k` and `v` `[kv, T, dh]`:
/// `softmax(scale * q k^T) v` where query `q` sees the keys `visible` gives
/// it. Returns `[kv, group * T, dh]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Arc<Visible>,
    scale: f32,
) -> Result<Tensor> {
    attention_keeping(q, k, v, visible, scale, KEEP_BYTES)
}

/// [`attention`] keeping the probabilities up to `keep_bytes`.
fn attention_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Arc<Visible>,
    scale: f32,
    keep_bytes: usize,
) -> Result<Tensor> {
    if q.dtype() != DType::F32 {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return attention_keeping(&f32(q)?, &f32(k)?, &f32(v)?, visible, scale, keep_bytes)?
            .to_dtype(q.dtype());
    }
    if q.device().is_cpu() {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            Attention {
                visible: visible.clone(),
                scale,
                lse: Mutex::new(Vec::new()),
                probs: Mutex::new(None),
                keep_bytes,
            },
        );
    }
    plain_attention(q, k, v, visible, scale)
}

/// What [`attention`] computes, from plain ops.
pub(crate) fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Visible,
    scale: f32,
) -> Result<Tensor> {
    let (kv, gt, _) = q.dims3()?;
    let t = visible.positions();
    let mut mask = vec![-1e9f32; t * t];
    for q in 0..t {
        let span = visible.span(q);
        mask[q * t + span.start..q * t + span.end].fill(0.0);
    }
    let mask = Tensor::from_vec(mask, (t, t), q.device())?;
    // [kv, group * T, T] as [kv, group, T, T], so that the [T, T] mask
    // lines up with each query head's rows.
    let scores = q.matmul(&k.t()?)?.reshape((kv, gt / t, t, t))?;
    plain_softmax(&(scores * f64::from(scale))?.broadcast_add(&mask)?)?
        .reshape((kv, gt, t))?
        .matmul(v)
}

/// A block of queries `q0..q1` and the keys `lo..hi` it multiplies against;
/// its probabilities, where kept, are `(q1 - q0) x (hi - lo)` at `offset` in
/// a head's.
#[derive(Debug, Clone, Copy)]
struct Block {
    q0: usize,
    q1: usize,
    lo: usize,
    hi: usize,
    offset: usize,
}

impl Block {
    fn rows(&self) -> usize {
        self.q1 - self.q0
    }

    /// The key chunks `c0..c1` of the block, `keys` at a time.
    fn chunks(&self, keys: usize) -> impl Iterator<Item = (usize, usize)> {
        let hi = self.hi;
        (self.lo..hi)
            .step_by(keys)
            .map(move |c0| (c0, c0.saturating_add(keys).min(hi)))
    }

    /// The keys of chunk `c0..c1` that query row `i` of the block sees,
    /// relative to `c0`; empty when it sees none of them.
    fn visible(
        &self,
        visible: &Visible,
        i: usize,
        (c0, c1): (usize, usize),
    ) -> std::ops::Range<usize> {
        let span = visible.span(self.q0 + i);
        let lo = span.start.max(c0);
        let hi = span.end.min(c1);
        if lo >= hi {
            return 0..0;
        }
        lo - c0..hi - c0
    }
}

/// The query blocks of a head of `visible.positions()` queries, and the
/// size of its probabilities.
fn blocks(visible: &Visible) -> Result<(Vec<Block>, usize)> {
    let t = visible.positions();
    let mut out = Vec::with_capacity(t.div_ceil(BLOCK));
    let mut offset = 0;
    for q0 in (0..t).step_by(BLOCK) {
        let q1 = (q0 + BLOCK).min(t);
        // Spans never move back along a row, so the block's first query
        // sees the earliest key and its last the latest.
        let (lo, hi) = (visible.span(q0).start, visible.span(q1 - 1).end);
        let bad = |q: usize| {
            let span = visible.span(q);
            !span.contains(&q) || span.start < lo || span.end > hi || hi > t
        };
        if (q0..q1).any(bad) {
            bail!("attention: each query must see itself, and the spans must not move back")
        }
        out.push(Block {
            q0,
            q1,
            lo,
            hi,
            offset,
        });
        offset += (q1 - q0) * (hi - lo);
    }
    Ok((out, offset))
}

/// `dst (m x n) = lhs (m x k) * rhs (k x n)`, or `dst +=` it with
/// `accumulate`; each operand as (data, row stride, column stride).
#[allow(unsafe_code)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The bounds gemm trusts us with.
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "attention: dst out of bounds"
    );
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "attention: lhs out of bounds"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "attention: rhs out of bounds"
    );
    // SAFETY: every element gemm reads or writes lies within the slices
    // (checked above); `dst` does not alias `lhs` or `rhs` (a `&mut`).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Shapes of the three inputs: (KV heads, group, T, dh).
fn dims(ql: &Layout, kl: &Layout, vl: &Layout, t: usize) -> Result<(usize, usize, usize)> {
    let (kv, gt, dh) = ql.shape().dims3()?;
    if kl.shape().dims3()? != (kv, t, dh) || vl.shape().dims3()? != (kv, t, dh) || gt % t != 0 {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} for {t} positions",
            ql.shape(),
            kl.shape(),
            vl.shape()
        )
    }
    Ok((kv, gt / t, dh))
}

struct Attention {
    visible: Arc<Visible>,
    scale: f32,
    /// Each query head's log-sum-exp of its scaled scores per query, kept
    /// from forward for backward: `[heads * T]`.
    lse: Mutex<Vec<f32>>,
    /// Each head's block probabilities, where they fit `keep_bytes`.
    probs: Mutex<Option<Vec<f32>>>,
    keep_bytes: usize,
}

/// One head's forward: `y` `[T, dh]` and `lse` `[T]` of `q` `[T, dh]`
/// against `k` and `v` `[T, dh]`, and its probabilities where `probs` is
/// given (each block is then one chunk of keys).
#[allow(clippy::too_many_arguments)]
fn head_forward(
    blocks: &[Block],
    visible: &Visible,
    scale: f32,
    dh: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    y: &mut [f32],
    lse: &mut [f32],
    mut probs: Option<&mut [f32]>,
    scores: &mut Vec<f32>,
) {
    let keys = if probs.is_some() { usize::MAX } else { KEYS };
    let (mut max, mut sum) = (vec![0.0f32; BLOCK], vec![0.0f32; BLOCK]);
    for b in blocks {
        let m = b.rows();
        let (max, sum) = (&mut max[..m], &mut sum[..m]);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        let acc = &mut y[b.q0 * dh..b.q1 * dh];
        acc.fill(0.0);
        for (c0, c1) in b.chunks(keys) {
            let n = c1 - c0;
            scores.resize(m * n, 0.0);
            // scores = Q[q0..q1] K[c0..c1]^T
            matmul(
                (m, n, dh),
                scores,
                n,
                false,
                (&q[b.q0 * dh..], dh, 1),
                (&k[c0 * dh..], 1, dh),
            );
            for (i, row) in scores.chunks_mut(n).enumerate() {
                let seen = b.visible(visible, i, (c0, c1));
                if seen.is_empty() {
                    row.fill(0.0);
                    continue;
                }
                let top = row[seen.clone()]
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &s| a.max(s * scale));
                let new = max[i].max(top);
                // Earlier chunks' sum and output, rescaled to the new maximum.
                let fix = (max[i] - new).exp();
                if fix != 1.0 {
                    sum[i] *= fix;
                    acc[i * dh..(i + 1) * dh].iter_mut().for_each(|a| *a *= fix);
                }
                max[i] = new;
                let mut s = 0.0f32;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = match seen.contains(&j) {
                        true => (*x * scale - new).exp(),
                        false => 0.0,
                    };
                    s += *x;
                }
                sum[i] += s;
            }
            // acc[q0..q1] += P V[c0..c1]
            matmul(
                (m, dh, n),
                acc,
                dh,
                true,
                (scores, n, 1),
                (&v[c0 * dh..], dh, 1),
            );
        }
        for i in 0..m {
            let inv = 1.0 / sum[i];
            acc[i * dh..(i + 1) * dh].iter_mut().for_each(|a| *a *= inv);
            lse[b.q0 + i] = max[i] + sum[i].ln();
        }
        if let Some(probs) = probs.as_deref_mut() {
            // One chunk: `scores` holds the block's unnormalized probabilities.
            let n = b.hi - b.lo;
            let out = &mut probs[b.offset..b.offset + m * n];
            for ((out, row), s) in out.chunks_mut(n).zip(scores.chunks(n)).zip(&*sum) {
                let inv = 1.0 / s;
                out.iter_mut().zip(row).for_each(|(o, x)| *o = x * inv);
            }
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "block-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_slice(qs, ql, "attention q")?,
            f32_slice(ks, kl, "attention k")?,
            f32_slice(vs, vl, "attention v")?,
        );
        let visible = self.visible.as_ref();
        let t = visible.positions();
        if t == 0 {
            bail!("attention: no positions")
        }
        let (_, group, dh) = dims(ql, kl, vl, t)?;
        let (blocks, per_head) = blocks(visible)?;
        let heads = q.len() / (t * dh);
        let keep = per_head * heads * std::mem::size_of::<f32>() <= self.keep_bytes;
        let mut probs = vec![0.0f32; if keep { per_head * heads } else { 0 }];
        let mut per_head_probs: Vec<Option<&mut [f32]>> = match keep {
            true => probs.chunks_mut(per_head).map(Some).collect(),
            false => (0..heads).map(|_| None).collect(),
        };
        let mut y = vec![0.0f32; q.len()];
        let mut lse = vec![0.0f32; q.len() / dh];
        y.par_chunks_mut(t * dh)
            .zip(lse.par_chunks_mut(t))
            .zip(per_head_probs.par_iter_mut())
            .enumerate()
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (h, ((y, lse), p))| {
                let kv = h / group;
                let q = &q[h * t * dh..(h + 1) * t * dh];
                let (k, v) = (&k[kv * t * dh..], &v[kv * t * dh..]);
                let p = p.as_deref_mut();
                head_forward(
                    &blocks,
                    visible,
                    self.scale,
                    dh,
                    (q, k, v),
                    y,
                    lse,
                    p,
                    scores,
                );
            });
        drop(per_head_probs);
        *self.lse.lock().expect("attention log-sum-exp") = lse;
        *self.probs.lock().expect("attention probabilities") = keep.then_some(probs);
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let visible = self.visible.as_ref();
        let t = visible.positions();
        let (kv, gt, dh) = q.dims3()?;
        let group = gt / t;
        let (blocks, per_head) = blocks(visible)?;
        let lse = self.lse.lock().expect("attention log-sum-exp");
        let kept = self.probs.lock().expect("attention probabilities");
        let keys = if kept.is_some() { usize::MAX } else { KEYS };
        if lse.len() != kv * gt {
            bail!("attention: backward without its forward's log-sum-exp")
        }
        // The inputs' data as stored (the forward made them contiguous).
        let (res, grad_res) = (res.contiguous()?, grad_res.contiguous()?);
        let stored = [q, k, v, &res, &grad_res].map(Tensor::storage_and_layout);
        let data = |i: usize, what: &str| -> Result<&[f32]> {
            let (storage, layout) = &stored[i];
            match &**storage {
                Storage::Cpu(s) => f32_slice(s, layout, what),
                _ => bail!("{what}: CPU tensor expected"),
            }
        };
        let (qd, kd, vd, yd, gd) = (
            data(0, "attention q")?,
            data(1, "attention k")?,
            data(2, "attention v")?,
            data(3, "attention output")?,
            data(4, "attention grad")?,
        );
        let scale = self.scale;
        let mut dq = vec![0.0f32; qd.len()];
        // Each query head's share of dK and dV, summed per KV head below.
        let parts: Vec<(Vec<f32>, Vec<f32>)> = dq
            .par_chunks_mut(t * dh)
            .enumerate()
            .map(|(h, dq)| {
                let kvh = h / group;
                let span = h * t * dh..(h + 1) * t * dh;
                let (q, y, g) = (&qd[span.clone()], &yd[span.clone()], &gd[span]);
                let (k, v) = (&kd[kvh * t * dh..], &vd[kvh * t * dh..]);
                let lse = &lse[h * t..(h + 1) * t];
                // D[q] = dY[q] . Y[q] = sum over keys of P dP.
                let d: Vec<f32> = g
                    .chunks(dh)
                    .zip(y.chunks(dh))
                    .map(|(g, y)| g.iter().zip(y).map(|(a, b)| a * b).sum())
                    .collect();
                let (mut dk, mut dv) = (vec![0.0f32; t * dh], vec![0.0f32; t * dh]);
                let kept = kept
                    .as_deref()
                    .map(|p| &p[h * per_head..(h + 1) * per_head]);
                let (mut fresh, mut ds) = (Vec::new(), Vec::new());
                for b in &blocks {
                    let m = b.rows();
                    for (c0, c1) in b.chunks(keys) {
                        let n = c1 - c0;
                        ds.resize(m * n, 0.0);
                        let p: &[f32] = match kept {
                            // One chunk per block, as the forward kept it.
                            Some(kept) => &kept[b.offset..b.offset + m * n],
                            None => {
                                // P = exp(scale Q[q0..q1] K[c0..c1]^T - lse), recomputed.
                                fresh.resize(m * n, 0.0);
                                matmul(
                                    (m, n, dh),
                                    &mut fresh,
                                    n,
                                    false,
                                    (&q[b.q0 * dh..], dh, 1),
                                    (&k[c0 * dh..], 1, dh),
                                );
                                for (i, p) in fresh.chunks_mut(n).enumerate() {
                                    let seen = b.visible(visible, i, (c0, c1));
                                    let l = lse[b.q0 + i];
                                    for (j, p) in p.iter_mut().enumerate() {
                                        *p = match seen.contains(&j) {
                                            true => (*p * scale - l).exp(),
                                            false => 0.0,
                                        };
                                    }
                                }
                                &fresh
                            }
                        };
                        // dP = dY[q0..q1] V[c0..c1]^T
                        matmul(
                            (m, n, dh),
                            &mut ds,
                            n,
                            false,
                            (&g[b.q0 * dh..], dh, 1),
                            (&v[c0 * dh..], 1, dh),
                        );
                        // dS = scale P (dP - D): zero where P is (keys not seen).
                        for (i, (p, ds)) in p.chunks(n).zip(ds.chunks_mut(n)).enumerate() {
                            let di = d[b.q0 + i];
                            for (p, ds) in p.iter().zip(ds.iter_mut()) {
                                *ds = scale * p * (*ds - di);
                            }
                        }
                        // dQ[q0..q1] += dS K[c0..c1]
                        matmul(
                            (m, dh, n),
                            &mut dq[b.q0 * dh..b.q1 * dh],
                            dh,
                            true,
                            (&ds, n, 1),
                            (&k[c0 * dh..], dh, 1),
                        );
                        // dK[c0..c1] += dS^T Q[q0..q1]; dV[c0..c1] += P^T dY[q0..q1]
                        matmul(
                            (n, dh, m),
                            &mut dk[c0 * dh..c1 * dh],
                            dh,
                            true,
                            (&ds, 1, n),
                            (&q[b.q0 * dh..], dh, 1),
                        );
                        matmul(
                            (n, dh, m),
                            &mut dv[c0 * dh..c1 * dh],
                            dh,
                            true,
                            (p, 1, n),
                            (&g[b.q0 * dh..], dh, 1),
                        );
                    }
                }
                (dk, dv)
            })
            .collect();
        let (mut dk, mut dv) = (vec![0.0f32; kd.len()], vec![0.0f32; vd.len()]);
        for (h, (pk, pv)) in parts.iter().enumerate() {
            let at = (h / group) * t * dh;
            for (o, x) in dk[at..at + t * dh].iter_mut().zip(pk) {
                *o += x;
            }
            for (o, x) in dv[at..at + t * dh].iter_mut().zip(pv) {
                *o += x;
            }
        }
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::tests::{max_diff, random};

    /// `max |a - b| / max |b|`.
    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let top = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        max_diff(a, b) / top
    }

    /// Forward and all three gradients against the plain ops, for a packed
    /// row of samples starting at `starts`, attended causally and whole,
    /// with two query heads per KV head, with the probabilities kept and
    /// recomputed.
    fn check(starts: Vec<u32>, seed: u64) {
        for visible in [
            Visible::causal(starts.clone()),
            Visible::bidirectional(starts),
        ] {
            for keep_bytes in [KEEP_BYTES, 0] {
                check_keeping(visible.clone(), seed, keep_bytes);
            }
        }
    }

    fn check_keeping(visible: Visible, seed: u64, keep_bytes: usize) {
        let t = visible.positions();
        let starts = Arc::new(visible);
        let (kv, group, dh) = (2, 2, 8);
        let q = Var::from_tensor(&random(&[kv, group * t, dh], seed)).unwrap();
        let k = Var::from_tensor(&random(&[kv, t, dh], seed + 1)).unwrap();
        let v = Var::from_tensor(&random(&[kv, t, dh], seed + 2)).unwrap();
        let w = random(&[kv, group * t, dh], seed + 3);
        let args = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = attention_keeping(args.0, args.1, args.2, &starts, 0.3, keep_bytes).unwrap();
        let plain = plain_attention(args.0, args.1, args.2, &starts, 0.3).unwrap();
        assert!(
            relative(&fused, &plain) < 1e-5,
            "{}",
            relative(&fused, &plain)
        );
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            let (a, b) = (gf.get(x).unwrap(), gp.get(x).unwrap());
            assert!(relative(a, b) < 1e-5, "{}", relative(a, b));
        }
    }

    #[test]
    fn block_attention_and_its_gradients_match_the_masked_plain_ops() {
        // One causal sample over several blocks, the last one partial.
        check(vec![0; 2 * BLOCK + 5], 10);
        // Packed samples, one of them straddling a block boundary.
        let mut starts = Vec::new();
        for (start, len) in [(0, 40), (40, 50), (90, 3), (93, 70)] {
            starts.extend(std::iter::repeat_n(start, len));
        }
        check(starts, 20);
    }

    #[test]
    fn the_online_softmax_over_several_key_chunks_matches_the_plain_ops() {
        // A sample longer than two key chunks and not a multiple of either
        // size, after a short one: its later blocks take three chunks.
        let mut starts = vec![0u32; 30];
        starts.extend(std::iter::repeat_n(30, 2 * KEYS + 77));
        check(starts, 30);
    }

    #[test]
    fn whole_samples_see_all_their_positions() {
        let v = Visible::bidirectional(vec![0, 0, 0, 3, 4, 4]);
        let spans: Vec<_> = (0..6).map(|q| v.span(q)).collect();
        assert_eq!(spans, [0..3, 0..3, 0..3, 3..4, 4..6, 4..6]);
        let c = Visible::causal(vec![0, 0, 2]);
        assert_eq!((c.span(1), c.span(2)), (0..2, 2..3));
    }

    #[test]
    fn a_query_sees_nothing_outside_its_sample() {
        // Changing the first sample's keys and values leaves the second
        // sample's outputs bitwise unchanged, causal or whole.
        let starts = [vec![0u32; 70], vec![70; 30]].concat();
        for visible in [
            Visible::causal(starts.clone()),
            Visible::bidirectional(starts.clone()),
        ] {
            sample_isolation(&Arc::new(visible));
        }
    }

    fn sample_isolation(starts: &Arc<Visible>) {
        let (q, k, v) = (
            random(&[1, 100, 4], 1),
            random(&[1, 100, 4], 2),
            random(&[1, 100, 4], 3),
        );
        for keep in [KEEP_BYTES, 0] {
            let y = attention_keeping(&q, &k, &v, starts, 0.5, keep).unwrap();
            let noise = Tensor::cat(
                &[
                    random(&[1, 70, 4], 4),
                    Tensor::zeros((1, 30, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
                ],
                1,
            )
            .unwrap();
            let y2 = attention_keeping(
                &q,
                &(&k + &noise).unwrap(),
                &(&v + &noise).unwrap(),
                starts,
                0.5,
                keep,
            )
            .unwrap();
            let tail = |y: &Tensor| {
                y.narrow(1, 70, 30)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(tail(&y), tail(&y2));
            assert!(max_diff(&y.narrow(1, 0, 70).unwrap(), &y2.narrow(1, 0, 70).unwrap()) > 1e-3);
        }
    }
}
