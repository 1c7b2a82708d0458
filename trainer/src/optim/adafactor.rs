//! Adafactor as Hugging Face's `transformers.optimization.Adafactor` with
//! an external learning rate (`relative_step = False`, `scale_parameter =
//! False`, `warmup_init = False`, `beta1 = None`): the second moment of a
//! matrix is kept as its row and column means, `beta2` rises as `1 -
//! step^-0.8`, and each update is clipped to RMS 1. Plain tensor ops, so it
//! runs on any device.

use candle_core::{DType, Result, Tensor, Var};

use super::State;

/// Added to squared gradients (Hugging Face's `eps[0]`).
const EPS: f64 = 1e-30;
/// `beta2` at step t is `1 - t^DECAY_RATE`.
const DECAY_RATE: f64 = -0.8;
/// Updates are scaled down to this RMS.
const CLIP_THRESHOLD: f64 = 1.0;

/// One Adafactor update of `var` with gradient `g` (f32) at `step` (from 1).
pub(super) fn update(
    var: &Var,
    g: &Tensor,
    state: &mut State,
    step: u64,
    lr: f64,
    scale: f64,
    weight_decay: f64,
) -> Result<()> {
    let theta = var.as_tensor();
    let g = (g * scale)?;
    let beta = 1.0 - (step as f64).powf(DECAY_RATE);
    let sq = (g.sqr()? + EPS)?;
    let update = match state {
        State::Factored { row, col } => {
            let last = g.rank() - 1;
            *row = ((&*row * beta)? + (sq.mean(last)? * (1.0 - beta))?)?;
            *col = ((&*col * beta)? + (sq.mean(last - 1)? * (1.0 - beta))?)?;
            // The second moment's estimate: row x column / mean of the row
            // means, as its reciprocal square root.
            let r = row
                .broadcast_div(&row.mean_keepdim(last - 1)?)?
                .sqrt()?
                .recip()?
                .unsqueeze(last)?;
            let c = col.unsqueeze(last - 1)?.sqrt()?.recip()?;
            r.broadcast_mul(&c)?.mul(&g)?
        }
        State::Unfactored { v } => {
            *v = ((&*v * beta)? + (sq * (1.0 - beta))?)?;
            v.sqrt()?.recip()?.mul(&g)?
        }
        _ => unreachable!("adafactor state"),
    };
    let rms = f64::from(update.sqr()?.mean_all()?.to_scalar::<f32>()?).sqrt();
    let update = (update / (rms / CLIP_THRESHOLD).max(1.0))?;
    let mut next = theta.to_dtype(DType::F32)?;
    if weight_decay != 0.0 {
        next = (next * (1.0 - weight_decay * lr))?;
    }
    let next = (next - (update * lr)?)?;
    var.set(&next.to_dtype(theta.dtype())?)
}
