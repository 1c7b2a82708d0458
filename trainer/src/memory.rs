//! What a training step needs in memory, estimated before it runs, so a
//! step that cannot fit fails with a clear error instead of an allocation
//! abort.
//!
//! The attention kernel keeps each sample's probabilities for the backward
//! pass: a step's memory grows with the square of its samples' lengths. On
//! the tiny recipe's model (2 layers, 4 heads) one-sample steps of 2,022,
//! 4,096 and 7,352 tokens peaked at 358, 651 and 1,501 MB
//! (`/usr/bin/time -v lvpipe train` on long documents; docs/trainer.md,
//! "Memory"): 23 bytes per squared token, about 3 per layer and head, which
//! this estimate uses. With the process's 264 MB before the first step, it
//! overestimated those peaks by 22 to 26%.

use crate::model::Config;

/// Bytes per squared sample token, per layer and head: the probabilities
/// kept for backward (2 bytes: a causal half of 4-byte floats) and the
/// block being computed.
const BYTES_PER_SQUARED_TOKEN: u64 = 3;

/// Estimated bytes a step over samples of `lengths` tokens (media
/// expanded), `loss_tokens` of them in the loss, adds to the process.
pub fn step_bytes(config: &Config, lengths: &[u64], loss_tokens: u64) -> u64 {
    let c = &config.llm;
    let heads = (c.num_hidden_layers * c.num_attention_heads) as u64;
    let quadratic: u64 = lengths
        .iter()
        .map(|&n| BYTES_PER_SQUARED_TOKEN * heads * n * n)
        .sum();
    let tokens: u64 = lengths.iter().sum();
    let per_token =
        (c.num_hidden_layers * (16 * c.hidden_size + 3 * c.intermediate_size) * 4) as u64;
    let logits = loss_tokens * c.vocab_size as u64 * 8;
    quadratic + tokens * per_token + logits
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

    #[test]
    fn the_estimate_grows_with_the_square_of_each_sample() {
        let config = crate::model::tests::tiny();
        let one = step_bytes(&config, &[1000], 0);
        let long = step_bytes(&config, &[4000], 0);
        let packed = step_bytes(&config, &[1000; 4], 0);
        // Four times the tokens in one sample: about sixteen times the
        // attention memory; in four samples, about four times.
        assert!(long > 12 * one, "{one} {long}");
        assert!(packed < 5 * one, "{one} {packed}");
        assert!(step_bytes(&config, &[1000], 1000) > one);
    }

    #[test]
    fn the_tiny_recipes_measured_peaks_are_covered() {
        // The tiny recipe's model, and the step peaks measured on it, less
        // the process's 264 MB before the first step.
        let mut config = crate::model::tests::tiny();
        (
            config.llm.num_hidden_layers,
            config.llm.num_attention_heads,
            config.llm.hidden_size,
            config.llm.intermediate_size,
            config.llm.vocab_size,
        ) = (2, 4, 128, 256, 1792);
        for (len, peak_mb) in [(2022u64, 358u64), (4096, 651), (7352, 1501)] {
            let estimate = step_bytes(&config, &[len], len) / 1_000_000;
            let measured = peak_mb - 264;
            assert!(
                estimate >= measured && estimate < 2 * measured,
                "{len} tokens: estimated {estimate} MB, measured {measured} MB"
            );
        }
    }
}
