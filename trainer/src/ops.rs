//! Fused CPU kernels with their gradients: the vision tower's attention
//! probabilities (`[heads, T, T]`), the log-probabilities over the
//! vocabulary (`[N, V]`), and the decoder's elementwise layers (RMSNorm,
//! RoPE with the split into heads, SwiGLU's gate). The decoder's attention
//! is one kernel of its own ([`crate::attention`]).
//!
//! Built from plain tensor ops, a softmax is a max, subtract, exp, sum and
//! divide: five passes over the scores forward and as many tensors kept for
//! backward. Here it is one pass forward, keeping only the probabilities,
//! and one pass backward; attention's 1/sqrt(head size) scale is applied
//! inside it.
//! Cross-entropy likewise never materializes the log-probabilities: forward
//! keeps the per-row loss, backward writes `softmax - one_hot`. RMSNorm
//! (six plain ops forward), RoPE (a transpose copy and nine ops) and
//! `silu(gate) * up` (two) are each one pass forward and one backward; the
//! backward passes that yield two gradients write both in that pass.
//!
//! Other devices (CUDA) take the plain-op path, which computes the same
//! function; the tests check the two against each other.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, InplaceOp2, InplaceOp3, Layout, Result, Shape,
    Tensor, bail,
};
use rayon::prelude::*;

/// Softmax over the last dimension of `scale` times `x` (the vision tower's
/// full attention).
pub fn softmax_last_dim(x: &Tensor, scale: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(FullSoftmax { scale });
    }
    plain_softmax(&(x * f64::from(scale))?)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    plain_rms_norm(x, w, eps)
}

/// SwiGLU's gate: `silu(gate) * up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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
    if logits.device().is_cpu() {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    plain_cross_entropy(logits, targets)
}

/// What the fused kernels compute, from plain ops: the path of other
/// devices, and the tests' reference.
pub(crate) fn plain_block_causal_softmax(
    scores: &Tensor,
    starts: &[u32],
    scale: f32,
) -> Result<Tensor> {
    let t = starts.len();
    let mut mask = vec![-1e9f32; t * t];
    for (q, &s) in starts.iter().enumerate() {
        mask[q * t + s as usize..=q * t + q].fill(0.0);
    }
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
    plain_softmax(&(scores * f64::from(scale))?.broadcast_add(&mask)?)
}

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

fn plain_softmax(x: &Tensor) -> Result<Tensor> {
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

fn f32_slice_mut<'a>(
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

/// Softmax of `scale * row` over `keys`, written to `out` (zero elsewhere).
pub(crate) fn softmax_row(
    row: &[f32],
    out: &mut [f32],
    keys: std::ops::RangeInclusive<usize>,
    scale: f32,
) {
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
pub(crate) fn softmax_grad_row(
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
fn softmax_fwd(storage: &CpuStorage, layout: &Layout, scale: f32) -> Result<(CpuStorage, Shape)> {
    let x = f32_slice(storage, layout, "softmax")?;
    let t = layout.dims()[layout.dims().len() - 1];
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .for_each(|(out, row)| softmax_row(row, out, 0..=t - 1, scale));
    Ok((CpuStorage::F32(y), layout.shape().clone()))
}

struct FullSoftmax {
    scale: f32,
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

struct SoftmaxGrad {
    scale: f32,
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

struct CrossEntropy;

fn targets_of<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        bail!("cross-entropy targets: u32 expected")
    };
    Ok(&data[contiguous(layout, "cross-entropy targets")?])
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

/// `1 / sqrt(mean(row^2) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

struct RmsNorm {
    eps: f32,
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
fn last_dim(layout: &Layout, want: usize, what: &str) -> Result<usize> {
    let h = layout.dims().last().copied().unwrap_or(0);
    if h != want || h == 0 {
        bail!("{what}: last dimension {h}, expected {want}")
    }
    Ok(h)
}

/// Rows of `y = x * r * w`, `r = 1 / rms(x)`: `dx = r * w * g - x * r^3 *
/// sum(g * w * x) / H` and `dw = sum over rows of g * x * r`, as a
/// `[rows + 1, H]` tensor whose last row is `dw`.
struct RmsNormGrad {
    eps: f32,
}

/// Rows per parallel task of the reductions over rows: fixed, so that the
/// sums, and hence the losses of a resumed run, do not depend on threads.
const ROW_BLOCK: usize = 32;

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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

struct SwiGlu;

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
struct SwiGluGrad;

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

/// Forward: `[T, n * dh]` to rotated heads `[n, T, dh]`. Inverse (the
/// gradient): rotated-head gradients `[n, T, dh]` back to `[T, n * dh]`,
/// rotating by minus the angle.
struct RopeHeads {
    heads: usize,
    rope: Arc<Rope>,
    inverse: bool,
}

/// Rotates `src` (one head's `dh` values) into `dst` by the angles whose
/// cos and sin are `cos`/`sin` (`dh / 2` each); `sign` -1 rotates back.
fn rotate(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
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

/// AdamW's moment update, in place on the moment: `m = beta * m + (1 -
/// beta) * scale * g`, or with `square`, `v = beta * v + (1 - beta) *
/// (scale * g)^2`. One pass over a parameter's moment and gradient, where the
/// plain ops took four and allocated as many tensors.
pub struct Moment {
    pub beta: f32,
    /// Clipping's factor on the gradient.
    pub scale: f32,
    pub square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let m = f32_slice_mut(ms, ml, "adam moment")?;
        let g = f32_slice(gs, gl, "adam gradient")?;
        if m.len() != g.len() {
            bail!("adam moment: {} moments for {} gradients", m.len(), g.len())
        }
        let (beta, rest, scale) = (self.beta, 1.0 - self.beta, self.scale);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * scale;
                    *m = beta * *m + rest * if self.square { g * g } else { g };
                }
            });
        Ok(())
    }
}

/// AdamW's parameter update, in place on the parameter: `theta = theta *
/// decay - lr * (m / c1) / (sqrt(v / c2) + eps)`, with `c1`, `c2` the bias
/// corrections and `decay` `1 - lr * weight_decay`.
pub struct AdamStep {
    pub lr: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    pub decay: f32,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let theta = f32_slice_mut(ps, pl, "adam parameter")?;
        let m = f32_slice(ms, ml, "adam first moment")?;
        let v = f32_slice(vs, vl, "adam second moment")?;
        if theta.len() != m.len() || theta.len() != v.len() {
            bail!(
                "adam step: {} parameters, {} and {} moments",
                theta.len(),
                m.len(),
                v.len()
            )
        }
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let update = (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
                    *p = *p * self.decay - update * self.lr;
                }
            });
        Ok(())
    }
}

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
    fn full_softmax_and_its_gradient_match_the_plain_ops() {
        let x = Var::from_tensor(&random(&[2, 5, 5], 3)).unwrap();
        let w = random(&[2, 5, 5], 4);
        let fused = softmax_last_dim(x.as_tensor(), 0.25).unwrap();
        let plain = plain_softmax(&(x.as_tensor() * 0.25).unwrap()).unwrap();
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
