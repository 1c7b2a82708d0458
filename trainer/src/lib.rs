//! The VILA-shaped model and the curriculum trainer (candle).
//!
//! This crate sits at the end of the data flow (shards -> mixes -> loader ->
//! trainer): [`model`] is the network, [`train`] the optimizer, schedule and
//! step, [`run`] one stage over its mix with checkpoints. The projector's
//! token arithmetic below is what planning needs before any weights exist.
//!
//! ```
//! // SigLIP at 384 px with 14 px patches: 27 x 27 patches -> 196 tokens per image.
//! assert_eq!(lvpipe_trainer::tokens_per_media(27 * 27), 196);
//! ```

pub mod attention;
pub mod bench;
pub mod model;
pub mod ops;
pub mod run;
pub mod train;

/// Tokens the `mlp_downsample` projector makes of `patches` vision patches:
/// 2x2 neighbours are concatenated (odd grids padded to even), so a
/// `sqrt(P) x sqrt(P)` grid becomes `ceil(sqrt(P)/2)^2` tokens.
pub fn tokens_per_media(patches: u32) -> u32 {
    let side = (patches as f64).sqrt().ceil() as u32;
    side.div_ceil(2).pow(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projector_token_counts_match_vila() {
        // 448 px / 14 = 32 -> 256 tokens; 384 px / 14 = 27 -> 196 (odd grid padded).
        assert_eq!(tokens_per_media(32 * 32), 256);
        assert_eq!(tokens_per_media(27 * 27), 196);
        assert_eq!(tokens_per_media(1), 1);
    }
}
