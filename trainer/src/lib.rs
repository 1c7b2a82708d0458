//! The VILA-shaped model and the curriculum trainer (candle).
//!
//! This crate follows the loader in the data flow (shards -> mixes ->
//! loader -> trainer -> eval): [`model`] is the network, one file per part
//! (SigLIP tower, projector, Qwen2 decoder, their VILA composition);
//! [`train`] the optimizer, schedule and step; [`run`] one stage over its mix
//! with checkpoints ([`checkpoint`]); [`chain`] the stages as a user starts
//! them (one, a chain mixed from shards, or a resume). Progress reaches the
//! caller as [`TrainEvent`]s. The projector's token arithmetic below is what
//! planning needs before any weights exist.
//!
//! ```
//! // SigLIP at 384 px with 14 px patches: 27 x 27 patches -> 196 tokens per image.
//! assert_eq!(lvpipe_trainer::tokens_per_media(27 * 27), 196);
//! ```
//!
//! ```no_run
//! use lvpipe_trainer::{Chain, chain};
//! # fn main() -> lvpipe_trainer::Result<()> {
//! let c = Chain {
//!     recipe: "recipes/tiny.toml".as_ref(),
//!     shards: "shards".as_ref(),
//!     tokenizer: "raw/tokenizer.json".as_ref(),
//!     out: "runs".as_ref(),
//!     mixes: None,
//!     stages: (1, 5),
//!     steps: None,
//!     clip: 1.0,
//!     save_every: 50,
//!     gradient_checkpointing: false,
//!     device: "cpu".into(),
//!     dtype: "f32".into(),
//! };
//! for (stage, summary) in chain(&c, &mut |_event| {})? {
//!     println!("stage {stage}: loss {:.3} -> {:.3}", summary.first_loss, summary.last_loss);
//! }
//! # Ok(()) }
//! ```

pub mod attention;
pub mod bench;
pub mod chain;
pub mod checkpoint;
pub mod device;
pub mod dist;
mod error;
pub mod hf;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
pub mod run;
mod seq_parallel;
pub mod train;

pub use chain::{Chain, RunSpec, TrainEvent, chain, resume, train_stage};
pub use checkpoint::{SavedConfig, TrainerState, finished};
pub use error::{Error, Result};
pub use run::Summary;

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
