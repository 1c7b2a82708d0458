//! Sequence parallelism as LongVILA's MM-SP does it (Ulysses mode): each
//! packed row is split over the `S` ranks of a sequence-parallel group.
//!
//! - The row's images and frames are encoded in balanced shares (image `i`
//!   by the group's rank `i % S`), and every rank gets all their tokens by a
//!   sum over the group ([`share_media`]).
//! - The expanded token sequence, padded to a multiple of `S` (the padding
//!   is a sample of its own that no loss reads), is cut into `S` contiguous
//!   parts ([`Shard`]); a rank embeds and runs its part through every layer.
//!   Position ids stay those of the whole row.
//! - Attention is the one global step: queries, keys and values go from
//!   sequence-split to head-split by an all-to-all over the group, each
//!   rank attends over the whole row for its `kv_heads / S` key-value heads
//!   (and their query heads), and a second all-to-all brings the outputs
//!   back to sequence-split ([`ulysses`]). The backward pass runs the same
//!   exchanges in reverse.
//! - Each rank scores the loss of its part; the trainer sums losses, token
//!   counts and gradients over all ranks, as for data parallelism.
//!
//! Every exchange is a candle op whose backward pass is the matching
//! exchange, so autograd works through them unchanged; all ranks of a group
//! run the same graph and so call the exchanges in the same order.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};

use crate::attention::{Visible, attention};
use crate::dist::SeqGroup;
use crate::ops::f32_slice;

/// How a decoder layer's attention runs: over a whole row, or over this
/// rank's part of a row split over a sequence-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqAttention {
    Whole,
    Ulysses(usize),
    Ring(SeqGroup),
}

impl SeqAttention {
    /// The attention of `q`, `k`, `v` (layouts of [`attention`]).
    pub(crate) fn attend(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        visible: &Arc<Visible>,
        scale: f32,
    ) -> Result<Tensor> {
        match self {
            SeqAttention::Whole => attention(q, k, v, visible, scale),
            SeqAttention::Ulysses(degree) => ulysses(q, k, v, visible, scale, degree),
            SeqAttention::Ring(group) => ring(q, k, v, visible, scale, group),
        }
    }
}

/// A rank's part of an expanded row of `total` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    /// The group.
    pub group: SeqGroup,
    /// Ring attention across the parts (else Ulysses).
    pub ring: bool,
    /// Positions per rank, padding included.
    pub len: usize,
    /// This rank's real positions: `start..end` (`end - start <= len`).
    pub start: usize,
    pub end: usize,
    /// Positions of the row before padding.
    pub total: usize,
}

impl Shard {
    pub(crate) fn new(group: SeqGroup, ring: bool, total: usize) -> Shard {
        let len = total.div_ceil(group.degree).max(1);
        let start = (group.rank * len).min(total);
        let end = ((group.rank + 1) * len).min(total);
        Shard {
            group,
            ring,
            len,
            start,
            end,
            total,
        }
    }

    /// How the layers attend across the parts.
    pub(crate) fn attention(&self) -> SeqAttention {
        match self.ring {
            true => SeqAttention::Ring(self.group),
            false => SeqAttention::Ulysses(self.group.degree),
        }
    }

    /// Positions of the padded row.
    pub(crate) fn padded(&self) -> usize {
        self.len * self.group.degree
    }

    pub(crate) fn contains(&self, position: usize) -> bool {
        (self.start..self.end).contains(&position)
    }

    /// Whether image `i` of a row is encoded on this rank.
    pub(crate) fn encodes(&self, image: usize) -> bool {
        image % self.group.degree == self.group.rank
    }
}

/// An exchange over the sequence-parallel group, as a candle op on f32
/// tensors whose gradient is the matching exchange of the output's gradient.
#[derive(Debug, Clone, Copy)]
enum Exchange {
    /// Of a tensor `[S, ...]`: block `j` goes to rank `j`, block `i` of the
    /// result came from rank `i`. Its own inverse.
    AllToAll,
    /// Every rank gets the sum. Every rank uses the sum, so each input's
    /// gradient is the sum of every rank's gradient of it.
    Sum,
    /// Each rank's tensor goes to the next rank (`backward`: the previous);
    /// its gradient goes the other way.
    Ring { backward: bool },
}

impl Exchange {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self)
    }
}

impl CustomOp1 for Exchange {
    fn name(&self) -> &'static str {
        match self {
            Exchange::AllToAll => "seq-all-to-all",
            Exchange::Sum => "seq-sum",
            Exchange::Ring { .. } => "seq-ring-shift",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = f32_slice(storage, layout, self.name())?;
        let group = crate::dist::group();
        let out = match *self {
            Exchange::AllToAll => group.seq_all_to_all(data),
            Exchange::Sum => {
                let mut sum = data.to_vec();
                group.seq_sum_f32(&mut sum).map(|()| sum)
            }
            Exchange::Ring { backward } => group.seq_ring_shift(data, backward),
        }
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = match *self {
            Exchange::Ring { backward } => Exchange::Ring {
                backward: !backward,
            },
            same => same,
        };
        Ok(Some(back.apply(grad)?))
    }
}

fn all_to_all(x: &Tensor) -> Result<Tensor> {
    Exchange::AllToAll.apply(x)
}

/// The media tokens `[N, tokens, H]` of a row's `N` images on every rank
/// of the group, from `local` `[n, tokens, H]`: this rank's images (those
/// [`Shard::encodes`]), in order. `None` stands for no local image.
pub(crate) fn share_media(
    shard: &Shard,
    local: Option<&Tensor>,
    images: usize,
    shape: (usize, usize),
) -> Result<Tensor> {
    let device = match local {
        Some(l) => l.device().clone(),
        None => candle_core::Device::Cpu,
    };
    let zeros = Tensor::zeros(shape, candle_core::DType::F32, &device)?;
    let mut k = 0;
    let mut all = Vec::with_capacity(images);
    for i in 0..images {
        match (shard.encodes(i), local) {
            (true, Some(local)) => {
                all.push(local.get(k)?.to_dtype(candle_core::DType::F32)?);
                k += 1;
            }
            _ => all.push(zeros.clone()),
        }
    }
    let summed = Exchange::Sum.apply(&Tensor::stack(&all, 0)?)?;
    match local {
        Some(l) => summed.to_dtype(l.dtype()),
        None => Ok(summed),
    }
}

/// Attention of this rank's part of a row, Ulysses style: `q` `[kv, group
/// * L, dh]` (a key-value head's `group` query heads stacked) and `k`, `v`
/// `[kv, L, dh]` hold this rank's `L` positions; `visible` covers the whole
/// padded row (`S * L` positions). Returns `[kv, group * L, dh]`.
///
/// Rank `j` of the group attends with query heads `j * H/S ..` over the
/// whole row: with `kv_heads / S` key-value heads where `S` divides them,
/// or, with more ranks than key-value heads, with the one their query heads
/// share, sent to each of those ranks (its gradients add up on the way
/// back).
pub(crate) fn ulysses(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Arc<Visible>,
    scale: f32,
    degree: usize,
) -> Result<Tensor> {
    let (kv, rows, dh) = q.dims3()?;
    let l = k.dim(1)?;
    let group = rows / l;
    let heads = kv * group;
    if !heads.is_multiple_of(degree) || !(kv.is_multiple_of(degree) || degree.is_multiple_of(kv)) {
        bail!(
            "sequence parallelism of degree {degree} needs it to divide the {heads} heads, \
             and to divide or be a multiple of the {kv} key-value heads"
        )
    }
    let dtype = q.dtype();
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
    // Query heads and key-value heads per rank, and which key-value heads
    // go to each rank, in rank order.
    let (hq, hk) = (heads / degree, (kv / degree).max(1));
    let kv_index: Vec<u32> = (0..degree)
        .flat_map(|j| match kv >= degree {
            true => (j * hk..(j + 1) * hk).map(|h| h as u32).collect::<Vec<_>>(),
            false => vec![(j * hq / group) as u32],
        })
        .collect();
    let kv_index = Tensor::new(kv_index.as_slice(), q.device())?;
    // Blocks in rank order; after the exchange block i holds positions
    // i*L.. of this rank's heads: side by side, the whole row in order.
    let spread = |x: Tensor, h: usize| -> Result<Tensor> {
        all_to_all(&x.reshape((degree, h, l, dh))?)?
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((h, degree * l, dh))
    };
    let q =
        spread(f32(q)?.reshape((heads, l, dh))?, hq)?.reshape((hk, hq / hk * degree * l, dh))?;
    let k = spread(f32(k)?.index_select(&kv_index, 0)?, hk)?;
    let v = spread(f32(v)?.index_select(&kv_index, 0)?, hk)?;
    let y = attention(&q, &k, &v, visible, scale)?;
    // Back: [hq, S, L, dh] -> [S, hq, L, dh], block j to rank j; block i
    // that comes back is query head group i of this rank's positions.
    all_to_all(&y.reshape((hq, degree, l, dh))?.permute((1, 0, 2, 3))?)?
        .reshape((kv, group * l, dh))?
        .to_dtype(dtype)
}

/// Attention of this rank's part of a row, ring style (LongVILA's ring
/// mode): `q` `[kv, group * L, dh]`, `k`, `v` `[kv, L, dh]` hold this
/// rank's `L` positions and `visible` covers the whole padded row. The
/// key-value blocks go around the group's ring, `S - 1` steps; each step
/// scores this rank's queries against the block it holds and the blocks'
/// results are joined by their running maxima (an online softmax), so no
/// rank ever holds more than two blocks of keys and values. Any degree
/// works; each step's scores are `L x L` per head (what the memory-linear
/// kernel avoids within a rank), also for a block no query of this rank
/// sees (a causal row's later parts).
pub(crate) fn ring(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Visible,
    scale: f32,
    group: SeqGroup,
) -> Result<Tensor> {
    use candle_core::{D, DType};
    let rows = q.dim(1)?;
    let l = k.dim(1)?;
    let heads_per_kv = rows / l;
    let (degree, rank) = (group.degree, group.rank);
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    let (mut k, mut v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let mut parts: Vec<(Tensor, Tensor, Tensor)> = Vec::with_capacity(degree);
    for step in 0..degree {
        // The block held now came from `step` ranks back.
        let owner = (rank + degree - step) % degree;
        let mut mask = vec![f32::NEG_INFINITY; l * l];
        for i in 0..l {
            let span = visible.span(rank * l + i);
            for j in 0..l {
                if span.contains(&(owner * l + j)) {
                    mask[i * l + j] = 0.0;
                }
            }
        }
        // Scored even where no query sees the block (its weights are then
        // 0): every rank's backward pass must run every exchange of the
        // ring, or a neighbour waits for it forever.
        let mask = Tensor::from_vec(mask, (1, l, l), q.device())?.repeat((1, heads_per_kv, 1))?;
        let scores = (q.matmul(&k.t()?)? * f64::from(scale))?.broadcast_add(&mask)?;
        // Each row's maximum, as a constant (it cancels in the softmax);
        // -1e30 for rows that see nothing of this block.
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let max = max.maximum(&max.ones_like()?.affine(0.0, -1e30)?)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        parts.push((max, e.matmul(&v)?, e.sum_keepdim(D::Minus1)?));
        if step + 1 < degree {
            let shift = |x: &Tensor| Exchange::Ring { backward: false }.apply(x);
            (k, v) = (shift(&k)?, shift(&v)?);
        }
    }
    // Every query sees at least its own position, in the block of its own
    // rank: `parts` is never empty.
    let top = parts
        .iter()
        .map(|(m, _, _)| m.clone())
        .reduce(|a, b| a.maximum(&b).expect("same shapes"))
        .expect("a rank's own block");
    let (mut num, mut den) = (None::<Tensor>, None::<Tensor>);
    for (max, n, d) in &parts {
        let w = (max - &top)?.exp()?;
        let (n, d) = (n.broadcast_mul(&w)?, (d * &w)?);
        num = Some(match num {
            None => n,
            Some(a) => (a + n)?,
        });
        den = Some(match den {
            None => d,
            Some(a) => (a + d)?,
        });
    }
    let (num, den) = (num.expect("parts"), den.expect("parts"));
    num.broadcast_div(&den)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_row_once_with_the_padding_last() {
        for (total, degree) in [(10, 2), (11, 4), (3, 4), (1, 2), (64, 4)] {
            let shards: Vec<Shard> = (0..degree)
                .map(|rank| Shard::new(SeqGroup { degree, rank }, false, total))
                .collect();
            let mut covered = Vec::new();
            for s in &shards {
                assert_eq!(s.len, shards[0].len);
                assert!(s.end - s.start <= s.len);
                covered.extend(s.start..s.end);
            }
            assert_eq!(
                covered,
                (0..total).collect::<Vec<_>>(),
                "{total} / {degree}"
            );
            assert!(shards[0].padded() >= total && shards[0].padded() < total + degree);
        }
        let images: Vec<usize> = (0..7)
            .filter(|&i| Shard::new(SeqGroup { degree: 3, rank: 1 }, false, 9).encodes(i))
            .collect();
        assert_eq!(images, [1, 4]);
    }
}
