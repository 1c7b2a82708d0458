//! What a training step needs in memory, estimated before it runs, so a
//! step that cannot fit fails with a clear error instead of an allocation
//! abort.
//!
//! Attention keeps at most `attention::KEEP_BYTES` of probabilities per
//! layer and recomputes the rest, so a step's memory is
//! linear in its tokens: each token's activations in every layer (in one
//! layer, plus every layer's input, with activation checkpointing) and its
//! logits (a chunk of them with checkpointing). The coefficients come from
//! `lvpipe bench-memory --recipe recipes/tiny.toml` (docs/benchmarks.md,
//! "Long context"): one-sample steps of 8,192 to 65,536 tokens took 62 to
//! 72 KB per token without checkpointing and 37 to 41 KB with it, above the
//! memory before the step; this estimate is 1.2 to 1.6 times those.

use crate::model::Config;

/// Floats per token that a layer's activations and their gradients take,
/// with `hidden` and `intermediate` sizes; doubled for a recomputed layer
/// (its forward and backward graphs live together).
fn layer_floats(hidden: u64, intermediate: u64) -> u64 {
    24 * hidden + 10 * intermediate
}

/// What a step needs besides its tokens: worker threads' buffers, the
/// allocator's slack.
const FIXED: u64 = 128 << 20;

/// Estimated bytes a step over samples of `lengths` tokens (media
/// expanded), `loss_tokens` of them in the loss, adds to the process.
pub fn step_bytes(config: &Config, lengths: &[u64], loss_tokens: u64, checkpointing: bool) -> u64 {
    let c = &config.llm;
    let (layers, hidden) = (c.num_hidden_layers as u64, c.hidden_size as u64);
    let (vocab, heads) = (c.vocab_size as u64, c.num_attention_heads as u64);
    let layer = layer_floats(hidden, c.intermediate_size as u64);
    let tokens: u64 = lengths.iter().sum();
    let kept: u64 = lengths.iter().map(|&n| n * n / 2 * heads * 4).sum::<u64>();
    let kept = kept.min(crate::attention::KEEP_BYTES as u64);
    let (activations, logits, kept) = match checkpointing {
        true => (
            tokens * (2 * layer + (layers + 2) * hidden) * 4,
            loss_tokens.min(crate::model::HEAD_CHUNK as u64) * vocab * 4 * 3,
            kept,
        ),
        false => (
            tokens * layers * layer * 4,
            loss_tokens * vocab * 6 * 4,
            kept * layers,
        ),
    };
    activations + logits + kept + FIXED
}

/// The environment variable that caps what [`available_bytes`] reports, in
/// bytes: to leave room for other processes on a shared machine.
pub const AVAILABLE_ENV: &str = "LVPIPE_MEMORY_AVAILABLE";

/// Memory this process may still take, in bytes: `MemAvailable`, or less
/// where a cgroup (a container's limit) or [`AVAILABLE_ENV`] allows less.
/// `None` where none of them can be read.
pub fn available_bytes() -> Option<u64> {
    let cap = std::env::var(AVAILABLE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let available = lvpipe_pipeline::meminfo_bytes("MemAvailable");
    let read = |file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{file}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    [available, cgroup, cap].into_iter().flatten().min()
}

/// GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny recipe's LLM (2 layers, d128, MLP 256, 4 heads,
    /// vocabulary 1,792).
    fn tiny_llm() -> Config {
        let mut config = crate::model::tests::tiny();
        (
            config.llm.num_hidden_layers,
            config.llm.num_attention_heads,
            config.llm.hidden_size,
            config.llm.intermediate_size,
            config.llm.vocab_size,
        ) = (2, 4, 128, 256, 1792);
        config
    }

    #[test]
    fn the_estimate_is_linear_in_the_tokens_and_smaller_with_checkpointing() {
        let config = tiny_llm();
        for checkpointing in [false, true] {
            let at = |n: u64| step_bytes(&config, &[n], n, checkpointing);
            let (a, b) = (at(32_768), at(65_536));
            // Twice the tokens, about twice the memory (plus the fixed part).
            assert!(b < 2 * a && b > a * 3 / 2, "{a} {b}");
        }
        assert!(
            step_bytes(&config, &[65_536], 65_536, true)
                < step_bytes(&config, &[65_536], 65_536, false) * 2 / 3
        );
    }

    #[test]
    fn the_tiny_recipes_measured_peaks_are_covered() {
        // `lvpipe bench-memory --recipe recipes/tiny.toml`: peak RSS less the
        // memory before the step, in MB, one sample filling the context.
        let config = tiny_llm();
        let measured = [
            (8_192u64, false, 551u64),
            (32_768, false, 2_030),
            (65_536, false, 4_689),
            (8_192, true, 325),
            (32_768, true, 1_223),
            (65_536, true, 2_651),
        ];
        for (len, checkpointing, mb) in measured {
            let estimate = step_bytes(&config, &[len], len, checkpointing) / 1_000_000;
            assert!(
                estimate >= mb && estimate < 2 * mb,
                "{len} tokens, checkpointing {checkpointing}: estimated {estimate} MB, measured {mb} MB"
            );
        }
    }
}
