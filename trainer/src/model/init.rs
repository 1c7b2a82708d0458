//! Seeded initialization: every parameter drawn from a generator keyed by
//! the seed and its name, so a fresh model is the same on every run.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;

use super::Config;

/// Re-initializes every parameter of `vars` from `seed`, with the
/// distributions [`Model::new`] uses (candle draws those from the thread
/// RNG): a fresh model is then the same on every run, so a stage started
/// from `base` is reproducible. The LLM's normal draws follow the config's
/// `initializer_range` and `init_std`.
pub fn init_seeded(vars: &VarMap, seed: u64, config: &Config) -> Result<()> {
    let mut names: Vec<String> = vars
        .data()
        .lock()
        .expect("var map lock")
        .keys()
        .cloned()
        .collect();
    names.sort();
    for name in names {
        reinit_one(vars, &name, seed, normal_std(config, &name))?;
    }
    Ok(())
}

/// The std of the normal draw of fresh parameter `name`, or none for
/// PyTorch's uniform(+-1/sqrt(fan_in)): the vision position embedding at
/// [`POSITION_EMBEDDING_STD`]; an LLM module named in `init_std` at its
/// value; the token embedding at Qwen2's 0.02 and every other LLM matrix
/// only with `initializer_range` (Hugging Face's Qwen2 draws them all from
/// it).
fn normal_std(config: &Config, name: &str) -> Option<f64> {
    if name.contains("position_embedding") {
        return Some(POSITION_EMBEDDING_STD);
    }
    if !name.starts_with("llm.") || name.contains("lora_") || !name.ends_with(".weight") {
        return None;
    }
    let module = name.trim_end_matches(".weight").rsplit('.').next();
    if let Some(std) = module.and_then(|m| config.init.init_std.get(m)) {
        return Some(*std);
    }
    match name.contains("embed_tokens") {
        true => Some(config.init.initializer_range.unwrap_or(0.02)),
        false => config.init.initializer_range,
    }
}

/// Standard deviation of the vision position embedding's entries at init:
/// 0.5, not SigLIP's 1/sqrt(width) (0.125 at the tiny recipe's width 64). A
/// tower trained from scratch behind the LLM did not learn where the shapes
/// are with SigLIP's: held-out position accuracy after stage 3 was 25% at
/// 0.125 (chance 20%), 99% at 1.0 and 98% at 0.5, and 0.5 kept colour (47%
/// at 1.0, 94% at 0.5; docs/trainer.md, "Why the tiny recipe is as it is").
pub(crate) const POSITION_EMBEDDING_STD: f64 = 0.5;

/// Draws parameter `name` afresh from a generator keyed by the seed and the
/// name (so adding parameters does not shift the others): from
/// normal(0, `normal_std`) when given, otherwise uniform(+-1/sqrt(fan_in));
/// biases and LoRA's B at 0, norm gains at 1.
pub(crate) fn reinit_one(
    vars: &VarMap,
    name: &str,
    seed: u64,
    normal_std: Option<f64>,
) -> Result<()> {
    let data = vars.data().lock().expect("var map lock");
    let var = &data[name];
    let dims = var.dims().to_vec();
    let n: usize = dims.iter().product();
    let mut state = seed
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let mut uniform = move || {
        let z = lvpipe_pipeline::splitmix(state);
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = if name.ends_with(".bias") || name.contains("lora_B") {
        vec![0.0; n]
    } else if name.contains("norm") || name == "mm_projector.layers.1.weight" {
        // Norm gains (the projector's LayerNorm is `layers.1`).
        vec![1.0; n]
    } else if let Some(std) = normal_std {
        (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n)
            .map(|_| ((uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    var.set(&Tensor::from_vec(values, dims, var.device())?)
}
