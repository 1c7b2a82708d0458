//! The training-step benchmark (`cargo bench -p lvpipe-trainer --bench step`,
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
use crate::model::{Config, Model, Row};
use crate::train::{AdamW, train_step};

/// Best-of and median step time and tokens/s over `steps` steps (at least
/// one) after 2 warm-up steps, as one JSON object.
pub fn train_step_bench(steps: usize) -> Result<serde_json::Value> {
    let config = Config {
        image_size: 8,
        patch_size: 4,
        downsample: 2,
        vision_hidden: 8,
        vision_layers: 0,
        vision_heads: 1,
        hidden: 256,
        intermediate: 1024,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        vocab: 8192,
        rope_base: 10000.0,
        tie_embeddings: false,
        initializer_range: None,
        init_std: Default::default(),
        partial_rotary_factor: 1.0,
        eps: 1e-6,
        image_token: 8191,
    };
    let device = Device::Cpu;
    let vars = VarMap::new();
    let model = Model::new(config, &vars, &device).context("model")?;
    let mut opt = AdamW::new(&vars, &[TrainableModule::Llm]).context("optimizer")?;
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
    let mut times = Vec::new();
    for step in 0..steps.max(1) + 2 {
        let start = Instant::now();
        train_step(&model, &mut opt, &rows, rows.len(), 1e-4, 1.0, &device)?;
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
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
