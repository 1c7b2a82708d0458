//! Rotary position tables: the angles of each position's dimension pairs,
//! with Hugging Face's `rope_scaling` types (linear, dynamic NTK, YaRN)
//! computed as `transformers`' `modeling_rope_utils` does, and lvpipe's
//! partial rotary.

use super::config::{Qwen2Config, RopeScaling};
use crate::ops;

/// What the tables of a decoder depend on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeSpec {
    pub(crate) base: f64,
    head_dim: usize,
    /// Dimensions that turn (`partial_rotary_factor`; the rest keep angle 0).
    rotated: usize,
    scaling: Option<RopeScaling>,
    max_position_embeddings: usize,
}

impl RopeSpec {
    pub(crate) fn new(c: &Qwen2Config) -> Self {
        let head_dim = c.head_dim();
        RopeSpec {
            base: c.rope_theta,
            head_dim,
            rotated: lvpipe_pipeline::recipe::rotary_dims(head_dim, c.partial_rotary_factor),
            scaling: c.rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
        }
    }

    /// Per turning pair, its angle per position, and the factor cos and sin
    /// are scaled by (YaRN's attention factor; 1 otherwise). `seq_len` is
    /// what dynamic scaling grows the base for.
    fn frequencies(&self, seq_len: usize) -> (Vec<f64>, f64) {
        let dim = self.rotated;
        let plain = |base: f64| -> Vec<f64> {
            (0..dim / 2)
                .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim as f64))
                .collect()
        };
        match self.scaling {
            None => (plain(self.base), 1.0),
            Some(RopeScaling::Linear { factor }) => {
                (plain(self.base).iter().map(|f| f / factor).collect(), 1.0)
            }
            Some(RopeScaling::Dynamic { factor }) => {
                let max = self.max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                let base = self.base
                    * ((factor * len / max) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                (plain(base), 1.0)
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
            }) => {
                let original =
                    original_max_position_embeddings.unwrap_or(self.max_position_embeddings) as f64;
                let attention = attention_factor.unwrap_or(match factor <= 1.0 {
                    true => 1.0,
                    false => 0.1 * factor.ln() + 1.0,
                });
                let correction = |rotations: f64| {
                    dim as f64 * (original / (rotations * std::f64::consts::TAU)).ln()
                        / (2.0 * self.base.ln())
                };
                let low = correction(beta_fast).floor().max(0.0);
                let mut high = correction(beta_slow).ceil().min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let freqs = plain(self.base)
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolated)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        extrapolated / factor * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                (freqs, attention)
            }
        }
    }

    /// cos and sin tables `[T, head_dim/2]` of the given positions' angles.
    pub(crate) fn tables(&self, positions: &[u32]) -> ops::Rope {
        let half = self.head_dim / 2;
        let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let (turning, scale) = self.frequencies(seq_len);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for i in 0..half {
                match turning.get(i) {
                    Some(freq) => {
                        // As transformers: frequencies and angles in f32.
                        let a = f64::from(p as f32 * *freq as f32);
                        cos.push((a.cos() * scale) as f32);
                        sin.push((a.sin() * scale) as f32);
                    }
                    None => {
                        cos.push(1.0);
                        sin.push(0.0);
                    }
                }
            }
        }
        ops::Rope { cos, sin, half }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(head_dim: usize, rotated: usize, base: f64, scaling: Option<RopeScaling>) -> RopeSpec {
        RopeSpec {
            base,
            head_dim,
            rotated,
            scaling,
            max_position_embeddings: 16,
        }
    }

    #[test]
    fn partial_rotary_turns_only_the_first_pairs_at_a_narrower_heads_frequencies() {
        let (dh, base) = (8, 100.0);
        let full = spec(dh, dh, base, None).tables(&[0, 7]);
        let half = spec(dh, dh / 2, base, None).tables(&[0, 7]);
        let angle = |r: &ops::Rope, pair: usize| r.sin[4 + pair].atan2(r.cos[4 + pair]);
        // Position 7: a full head's pairs turn at 1, 100^-1/4, 100^-1/2,
        // 100^-3/4 per position; a half-rotary head's first two pairs at 1
        // and 100^-1/2, and the other two not at all.
        assert!((angle(&half, 0) - angle(&full, 0)).abs() < 1e-6);
        assert!((angle(&half, 1) - 0.7).abs() < 1e-6);
        assert!((angle(&full, 2) - 0.7).abs() < 1e-6);
        for pair in 2..4 {
            assert_eq!((half.cos[4 + pair], half.sin[4 + pair]), (1.0, 0.0));
        }
    }

    #[test]
    fn linear_scaling_is_position_interpolation() {
        let scaled = spec(8, 8, 100.0, Some(RopeScaling::Linear { factor: 4.0 })).tables(&[8]);
        let plain = spec(8, 8, 100.0, None).tables(&[2]);
        for (a, b) in scaled.cos.iter().zip(&plain.cos) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn dynamic_scaling_changes_nothing_within_the_trained_context() {
        let dynamic = spec(8, 8, 100.0, Some(RopeScaling::Dynamic { factor: 2.0 }));
        let plain = spec(8, 8, 100.0, None);
        assert_eq!(dynamic.tables(&[3, 15]).cos, plain.tables(&[3, 15]).cos);
        // Past it the base grows, so the slowest pair turns more slowly.
        let (long, _) = dynamic.frequencies(64);
        let (short, _) = plain.frequencies(64);
        assert!(long[3] < short[3] && (long[0] - short[0]).abs() < 1e-12);
    }
}
