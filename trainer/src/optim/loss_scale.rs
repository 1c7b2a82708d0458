//! Dynamic loss scaling for f16 compute, as PyTorch's `GradScaler`: the
//! loss is multiplied by a large factor before the backward pass so that
//! small activation gradients stay above f16's smallest normal number
//! (6.1e-5), and the parameter gradients are divided by it again before the
//! update. A step whose gradients overflow (inf or NaN) changes no weight:
//! the factor halves and training goes on. After
//! [`LossScale::GROWTH_INTERVAL`] good steps in a row it doubles again.

use serde::{Deserialize, Serialize};

/// The loss-scaling factor and the good steps since it last changed;
/// recorded in `trainer_state.json` so a resumed run goes on with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// `GradScaler`'s `init_scale`, 2^16.
    pub const INITIAL: f64 = 65536.0;
    /// `GradScaler`'s `growth_interval`.
    pub const GROWTH_INTERVAL: u32 = 2000;
    /// Gradients that still overflow with the loss unscaled do not come
    /// from the scale: the step diverged.
    pub const MIN: f64 = 1.0;

    /// The loss scaling a step computing in `dtype` needs: f16's, from
    /// [`LossScale::INITIAL`]; none for f32 and bf16 (bf16 has f32's range).
    pub fn for_dtype(dtype: candle_core::DType) -> Option<Self> {
        (dtype == candle_core::DType::F16).then(Self::default)
    }

    /// After a step whose gradients overflowed: halves the factor. False
    /// when it would fall below [`LossScale::MIN`].
    pub fn overflowed(&mut self) -> bool {
        self.good_steps = 0;
        if self.scale * 0.5 < Self::MIN {
            return false;
        }
        self.scale *= 0.5;
        true
    }

    /// After a step whose gradients were finite.
    pub fn stepped(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_a_run_of_good_steps() {
        let mut s = LossScale::default();
        assert!(s.overflowed());
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.stepped();
        }
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        // An overflow restarts the count.
        assert!(s.overflowed());
        for _ in 0..LossScale::GROWTH_INTERVAL {
            s.stepped();
        }
        assert_eq!((s.scale, s.good_steps), (LossScale::INITIAL / 2.0, 0));
        let mut low = LossScale {
            scale: 1.0,
            good_steps: 3,
        };
        assert!(!low.overflowed());
        assert_eq!(low.scale, 1.0);
    }
}
