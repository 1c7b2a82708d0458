//! The training benchmarks: `bench-memory` ([`memory_step_bench`]) and the
//! training-step benchmark (`cargo bench -p lvpipe-trainer --bench step`,
//! or `lvpipe bench-step` with the release binary): the shapes of
//! `benches/peers/train_step.py` and of the reference measurement in
//! ../shared/reference/peer-benchmarks.md: 4 layers, hidden 256, 4 heads,
//! MLP 1024, vocabulary 8192, 4 rows of 512 tokens, fp32, AdamW, every token
//! in the loss.

use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;

use lvpipe_schemas::TrainableModule;

use crate::Result;
use crate::error::TensorContext;
use crate::model::{
    Activation, Config, Model, ProjectorConfig, Qwen2Config, Row, SelectFeature, SiglipVisionConfig,
};
use crate::optim::{Optimizer, OptimizerKind};
use crate::train::{StepSettings, train_step};

/// This process (a group of one unless a launcher started it), the whole
/// batch in one pass, at a small learning rate.
fn one_process(device: &Device) -> StepSettings<'_> {
    StepSettings::new(1e-4, 1.0, device, crate::dist::group())
}

/// Best-of and median step time and tokens/s over `steps` steps (at least
/// one) after 2 warm-up steps, as one JSON object.
pub fn train_step_bench(steps: usize) -> Result<serde_json::Value> {
    let config = Config {
        llm: Qwen2Config {
            vocab_size: 8192,
            hidden_size: 256,
            intermediate_size: 1024,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            partial_rotary_factor: 1.0,
        },
        vision: Some(SiglipVisionConfig {
            hidden_size: 8,
            intermediate_size: 32,
            num_hidden_layers: 0,
            num_attention_heads: 1,
            image_size: 8,
            patch_size: 4,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
        }),
        projector: ProjectorConfig { downsample: 2 },
        mm_vision_select_layer: -1,
        mm_vision_select_feature: SelectFeature::ClsPatch,
        image_token: 8191,
        init: Default::default(),
    };
    let device = Device::Cpu;
    let vars = VarMap::new();
    let model = Model::new(config, &vars, &device).context("model")?;
    let mut opt = Optimizer::new(&vars, &[TrainableModule::Llm], OptimizerKind::AdamW)
        .context("optimizer")?;
    let (rows_n, t) = (4, 512);
    let ids: Vec<Vec<u32>> = (0..rows_n)
        .map(|r| {
            (0..t)
                .map(|i| ((i * 7919 + r * 104729) % 8000) as u32)
                .collect()
        })
        .collect();
    let mask = vec![1u8; t];
    let bounds = [0u32, t as u32];
    let names = vec!["bench".to_string()];
    let rows: Vec<(Row, &[String])> = ids
        .iter()
        .map(|ids| {
            (
                Row {
                    input_ids: ids,
                    loss_mask: &mask,
                    boundaries: &bounds,
                    pixels: &[],
                },
                names.as_slice(),
            )
        })
        .collect();
    let times = timed(2, steps, || {
        train_step(&model, &mut opt, &rows, &one_process(&device)).map(|_| ())
    })?;
    let tokens = (rows_n * t) as f64;
    Ok(serde_json::json!({
        "bench": "train step, 4 x 512 tokens, 4 layers d256",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        "best_s": times[0],
        "median_s": times[times.len() / 2],
        "tokens_per_s_best": tokens / times[0],
        "tokens_per_s_median": tokens / times[times.len() / 2],
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    }))
}

/// The process's peak and current resident memory in bytes (`VmHWM`,
/// `VmRSS`), where /proc tells.
pub fn resident_bytes() -> (Option<u64>, Option<u64>) {
    let field = lvpipe_pipeline::process_status_bytes;
    (field("VmHWM"), field("VmRSS"))
}

/// One long-context training step of a recipe's LLM (no vision tower):
/// one sample of `context` tokens, every token in the loss, with or without
/// activation checkpointing, under `optimizer`, on `device` computing in
/// `dtype`. Runs one untimed step and `steps` timed ones; reports the best
/// step's time and the process's peak resident memory (run it in a fresh
/// process per setting: the peak never falls), with the memory before the
/// first step (weights and optimizer state) beside it; on a GPU, the
/// device's peak too.
pub fn memory_step_bench(
    model: &lvpipe_pipeline::recipe::ModelConfig,
    context: usize,
    checkpointing: bool,
    optimizer: OptimizerKind,
    steps: usize,
    device: &Device,
    dtype: candle_core::DType,
) -> Result<serde_json::Value> {
    let mut config = Config::from_recipe(model, model.vocab_size - 1);
    config.vision = None;
    let device = device.clone();
    let vars = VarMap::new();
    let mut model = Model::new(config.clone(), &vars, &device).context("model")?;
    model.set_gradient_checkpointing(checkpointing);
    model.set_compute_dtype(dtype);
    let mut opt = Optimizer::new(&vars, &[TrainableModule::Llm], optimizer).context("optimizer")?;
    let vocab = config.llm.vocab_size - 1;
    let ids: Vec<u32> = (0..context).map(|i| ((i * 7919) % vocab) as u32).collect();
    let mask = vec![1u8; context];
    let bounds = [0u32, context as u32];
    let names = vec!["bench".to_string()];
    let row = Row {
        input_ids: &ids,
        loss_mask: &mask,
        boundaries: &bounds,
        pixels: &[],
    };
    let rows = [(row, names.as_slice())];
    let params: usize = vars
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().elem_count())
        .sum();
    opt.loss_scale = crate::optim::LossScale::for_dtype(dtype);
    let before = resident_bytes().1;
    let device_before = crate::device::peak_device_bytes(&device, true)?;
    let times = timed(1, steps, || {
        train_step(
            &model,
            &mut opt,
            &rows,
            &StepSettings {
                micro_batch: 1,
                ..one_process(&device)
            },
        )?;
        device.synchronize().context("device")
    })?;
    let (peak, _) = resident_bytes();
    let device_peak = crate::device::peak_device_bytes(&device, false)?;
    let mb = |b: Option<u64>| b.map(|b| (b as f64 / 1e6).round());
    Ok(serde_json::json!({
        "context": context,
        "gradient_checkpointing": checkpointing,
        "optimizer": optimizer.as_str(),
        "device": crate::device::name(&device),
        "dtype": dtype.as_str(),
        "peak_rss_mb": mb(peak),
        "rss_before_step_mb": mb(before),
        "peak_device_mb": mb(device_peak),
        "device_before_step_mb": mb(device_before),
        "parameters": params,
        "optimizer_state_bytes": opt.state_bytes().context("optimizer state")?,
        "step_s": times[0],
        "tokens_per_s": context as f64 / times[0],
        "threads": rayon::current_num_threads(),
    }))
}

/// Runs `step` `warmup` times untimed, then `steps` times (at least once)
/// timed; the timed seconds, fastest first.
fn timed(warmup: usize, steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        step()?;
    }
    let mut times = (0..steps.max(1))
        .map(|_| {
            let start = Instant::now();
            step().map(|()| start.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times)
}
