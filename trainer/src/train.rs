//! Training one stage: trainable modules, warmup then cosine or
//! constant learning rate, global-norm clipping, masked loss, and a
//! non-finite guard that names the step and the samples.

use candle_core::{DType, Device, Result as CandleResult, Tensor};
use lvpipe_pipeline::recipe::Schedule;
use lvpipe_schemas::TrainableModule;

use crate::dist::Group;
use crate::{Error, Result};

use crate::model::{Model, Row};
use crate::optim::Optimizer;

/// Which parameters a stage trains, by the recipe's module names.
///
/// `llm_lora` trains the low-rank adapters of the attention projections
/// (q, k, v, o; [`Model::attach_lora`]), not the projections themselves;
/// the adapters are merged into them at the end of the stage.
pub fn is_trainable(name: &str, modules: &[TrainableModule]) -> bool {
    modules.iter().any(|m| match m {
        TrainableModule::Vision => name.starts_with("vision_tower."),
        TrainableModule::Projector => name.starts_with("mm_projector."),
        TrainableModule::Llm => name.starts_with("llm."),
        TrainableModule::LlmLora => name.starts_with("llm.") && name.contains(".lora_"),
        TrainableModule::Embed => {
            name.starts_with("llm.model.embed_tokens.") || name.starts_with("llm.lm_head.")
        }
        TrainableModule::Norm => name.starts_with("llm.") && name.contains("norm"),
    })
}

/// Learning rate at `step` of `total`: linear warmup over `warmup` (a
/// fraction of the steps), then constant or cosine to zero.
pub fn learning_rate(peak: f64, schedule: Schedule, warmup: f64, step: u64, total: u64) -> f64 {
    let total = total.max(1) as f64;
    let warm = (warmup * total).ceil().max(0.0);
    let s = step as f64;
    if s < warm {
        return peak * (s + 1.0) / warm;
    }
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let progress = ((s - warm) / (total - warm).max(1.0)).min(1.0);
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub loss_tokens: f64,
    /// Forward and backward passes the gradients accumulated over.
    pub micro_batches: usize,
    /// The loss-scaling factor the step's backward passes used (f16).
    pub loss_scale: Option<f64>,
    /// The gradients overflowed under loss scaling: no weight changed.
    pub skipped: bool,
}

/// The rows of a micro-batch end to end, as one row: its samples stay
/// apart (positions restart and attention stays within each sample), so
/// the loss is the sum of the rows' losses, while every matrix product runs
/// once over all of them instead of once per row, and each weight's
/// gradient comes out as one tensor instead of a sum of one per row.
struct JoinedRows {
    input_ids: Vec<u32>,
    loss_mask: Vec<u8>,
    boundaries: Vec<u32>,
    pixels: Vec<f32>,
}

impl JoinedRows {
    fn new<'a, 'r: 'a>(rows: impl Iterator<Item = &'a Row<'r>>) -> Self {
        let mut j = JoinedRows {
            input_ids: Vec::new(),
            loss_mask: Vec::new(),
            boundaries: vec![0],
            pixels: Vec::new(),
        };
        for row in rows {
            // Tokens after the last boundary (padding) belong to no sample.
            let end = row.boundaries.last().map_or(0, |&b| b as usize);
            let base = j.input_ids.len() as u32;
            j.input_ids.extend_from_slice(&row.input_ids[..end]);
            j.loss_mask.extend_from_slice(&row.loss_mask[..end]);
            j.boundaries
                .extend(row.boundaries.iter().skip(1).map(|b| base + b));
            j.pixels.extend_from_slice(row.pixels);
        }
        j
    }

    fn row(&self) -> Row<'_> {
        Row {
            input_ids: &self.input_ids,
            loss_mask: &self.loss_mask,
            boundaries: &self.boundaries,
            pixels: &self.pixels,
        }
    }
}

/// How one step runs: micro-batch size, learning rate, clipping, where,
/// and with which group of processes.
#[derive(Clone, Copy)]
pub struct StepSettings<'a> {
    /// Rows per forward and backward pass (the gradients accumulate).
    pub micro_batch: usize,
    pub lr: f64,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    pub device: &'a Device,
    /// The data-parallel group: each rank holds its share of the global
    /// batch, and the gradients are summed over the ranks.
    pub group: &'a Group,
}

impl<'a> StepSettings<'a> {
    /// One process on `device`, the whole batch in one pass.
    pub fn new(lr: f64, clip: f64, device: &'a Device, group: &'a Group) -> Self {
        StepSettings {
            micro_batch: usize::MAX,
            lr,
            clip,
            device,
            group,
        }
    }
}

/// Forward and backward over `rows` (this rank's share of one global batch)
/// in micro-batches, gradients summed over the passes and the ranks, then
/// one update: the loss is the mean over every masked token of the whole
/// global batch, whatever the split. Under the optimizer's loss scaling,
/// each backward pass starts from the scaled loss, and a step whose
/// gradients overflow is skipped. Every decision (divergence, overflow,
/// clipping) is taken on numbers all ranks share, so they take it together.
pub fn train_step(
    model: &Model,
    opt: &mut Optimizer,
    rows: &[(Row, &[String])],
    settings: &StepSettings,
) -> Result<StepRecord> {
    let StepSettings {
        micro_batch,
        lr,
        clip,
        device,
        group,
    } = *settings;
    let this_step = opt.step + 1;
    let fail = |source: candle_core::Error| Error::Tensor {
        context: format!("step {this_step}"),
        source,
    };
    let mut totals = [
        rows.iter()
            .map(|(row, _)| f64::from(model.loss_tokens(row)))
            .sum(),
        // A sequence-parallel group's ranks share their rows: one counts them.
        match group.sequence_parallel().rank {
            0 => rows.iter().map(|(row, _)| row.input_ids.len() as f64).sum(),
            _ => 0.0,
        },
    ];
    group.sum_f64(&mut totals)?;
    let [count, tokens] = totals;
    let samples = |rows: &[(Row, &[String])]| -> String {
        rows.iter()
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let loss_scale = opt.loss_scale.map(|s| s.scale);
    let mut acc: Option<Vec<Option<Tensor>>> = None;
    let mut loss = 0f64;
    let mut passes = 0;
    let mut diverged = None;
    for chunk in rows.chunks(micro_batch.max(1)) {
        let joined = JoinedRows::new(chunk.iter().map(|(row, _)| row));
        let part = model
            .row_loss(&joined.row(), device)
            .and_then(|(sum, _, _)| sum / count.max(1.0))
            .map_err(fail)?;
        let value = f64::from(part.to_scalar::<f32>().map_err(fail)?);
        if !value.is_finite() {
            diverged = Some((value, samples(chunk)));
            break;
        }
        loss += value;
        passes += 1;
        let mut grads = match loss_scale {
            Some(factor) => (&part * factor).and_then(|p| p.backward()),
            None => part.backward(),
        }
        .map_err(fail)?;
        model.merge_recomputed(&mut grads).map_err(fail)?;
        let grads = opt.collect(&grads);
        acc = Some(match acc {
            None => grads,
            Some(sum) => sum
                .into_iter()
                .zip(grads)
                .map(|(a, g)| match (a, g) {
                    (Some(a), Some(g)) => (a + g).map(Some),
                    (a, g) => Ok(a.or(g)),
                })
                .collect::<CandleResult<_>>()
                .map_err(fail)?,
        });
    }
    // The loss of the whole batch, and whether any rank's diverged.
    let mut shared = [loss, f64::from(u8::from(diverged.is_some()))];
    group.sum_f64(&mut shared)?;
    if shared[1] > 0.0 {
        let (value, samples) = diverged.unwrap_or((f64::NAN, "on another rank".into()));
        return Err(Error::Diverged {
            step: this_step,
            loss: value,
            samples,
        });
    }
    let loss = shared[0];
    let grads = match acc {
        Some(grads) => grads,
        None => opt.names().map(|_| None).collect(),
    };
    let grads = sum_over_ranks(opt, grads, group, device).map_err(fail)?;
    let unscale = 1.0 / loss_scale.unwrap_or(1.0);
    let norm = opt.grad_norm(&grads).map_err(fail)? * unscale;
    let record = |grad_norm: f64, skipped: bool, step: u64| StepRecord {
        step,
        loss,
        lr,
        grad_norm,
        tokens: tokens as u64,
        loss_tokens: count,
        micro_batches: passes,
        loss_scale,
        skipped,
    };
    if !norm.is_finite()
        && let Some(scaler) = &mut opt.loss_scale
        && scaler.overflowed()
    {
        opt.skip();
        return Ok(record(norm, true, opt.step));
    }
    if !norm.is_finite() {
        return Err(Error::Diverged {
            step: this_step,
            loss: norm,
            samples: format!("{} (the gradient norm)", samples(rows)),
        });
    }
    let scale = if clip > 0.0 && norm > clip {
        clip / norm
    } else {
        1.0
    };
    opt.update(&grads, lr, scale * unscale).map_err(fail)?;
    if let Some(scaler) = &mut opt.loss_scale {
        scaler.stepped();
    }
    Ok(record(norm, false, opt.step))
}

/// The gradients summed over the group's ranks (in [`Optimizer::names`]
/// order): each as f32 with a presence flag, so that a parameter no rank's
/// rows reached stays `None`, as in one process over the whole batch.
fn sum_over_ranks(
    opt: &Optimizer,
    grads: Vec<Option<Tensor>>,
    group: &Group,
    device: &Device,
) -> CandleResult<Vec<Option<Tensor>>> {
    if group.size() == 1 {
        return Ok(grads);
    }
    let shapes = opt.shapes();
    let mut flat = Vec::with_capacity(shapes.iter().map(|s| s.elem_count() + 1).sum());
    for (g, shape) in grads.iter().zip(&shapes) {
        match g {
            Some(g) => {
                flat.push(1.0);
                flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            None => {
                flat.push(0.0);
                flat.resize(flat.len() + shape.elem_count(), 0.0);
            }
        }
    }
    group
        .sum_f32(&mut flat)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut at = 0;
    shapes
        .iter()
        .map(|shape| {
            let (present, n) = (flat[at] > 0.0, shape.elem_count());
            let values = &flat[at + 1..at + 1 + n];
            at += 1 + n;
            present
                .then(|| Tensor::from_slice(values, shape, device))
                .transpose()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use crate::optim::{LossScale, OptimizerKind};
    use candle_core::DType;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    fn config() -> Config {
        let mut c = crate::model::tests::tiny();
        c.vision.as_mut().unwrap().image_size = 8;
        c.llm.intermediate_size = 32;
        c.llm.num_hidden_layers = 1;
        (c.llm.num_attention_heads, c.llm.num_key_value_heads) = (2, 1);
        c.llm.vocab_size = 20;
        c.image_token = 19;
        c
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let lr = |s| learning_rate(1.0, Schedule::Cosine, 0.1, s, 100);
        assert!(lr(0) < lr(5) && (lr(9) - 1.0).abs() < 1e-9);
        assert!(lr(50) < 1.0 && lr(99) < 0.01);
        assert_eq!(learning_rate(0.5, Schedule::Constant, 0.0, 80, 100), 0.5);
    }

    #[test]
    fn frozen_modules_stay_bitwise_unchanged_and_the_loss_falls() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let model = Model::new(config(), &vars, &device).unwrap();
        crate::model::tests::seed_vars(&vars, 1);
        let before = snapshot(&vars);
        // Stage 1 trains the projector only.
        let modules = vec![TrainableModule::Projector];
        let mut opt = Optimizer::new(&vars, &modules, OptimizerKind::AdamW).unwrap();
        assert!(opt.names().all(|n| n.starts_with("mm_projector.")));
        let ids: Vec<u32> = vec![1, 19, 3, 4, 5, 6, 3, 4, 5, 6];
        let mask: Vec<u8> = vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1];
        let pixels: Vec<f32> = (0..3 * 64).map(|i| (i % 7) as f32 / 3.5 - 1.0).collect();
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &[0, 10],
            pixels: &pixels,
        };
        let losses = repeat_step(&model, &mut opt, &row, 30, 1e-2, 1.0);
        // The projector alone can only move what the text after the image
        // sees of it; the loss still has to fall.
        assert!(losses[29] < losses[0] - 0.05, "{losses:?}");
        let after = snapshot(&vars);
        let mut changed = 0;
        for (name, values) in &before {
            if is_trainable(name, &modules) {
                changed += usize::from(after[name] != *values);
            } else {
                assert_eq!(after[name], *values, "{name} is frozen but changed");
            }
        }
        assert!(changed > 0);
    }

    /// One sample with an image, for the precision tests.
    struct ImageRow {
        ids: Vec<u32>,
        mask: Vec<u8>,
        bounds: [u32; 2],
        pixels: Vec<f32>,
    }

    impl ImageRow {
        fn row(&self) -> Row<'_> {
            Row {
                input_ids: &self.ids,
                loss_mask: &self.mask,
                boundaries: &self.bounds,
                pixels: &self.pixels,
            }
        }
    }

    fn image_row() -> ImageRow {
        ImageRow {
            ids: vec![1, 19, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8, 3, 4],
            mask: vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            bounds: [0, 14],
            pixels: (0..3 * 64).map(|i| (i % 7) as f32 / 3.5 - 1.0).collect(),
        }
    }

    /// A seeded model computing in `dtype` and an AdamW over all of it,
    /// loss-scaled in f16 as a run sets it up.
    fn all_modules(dtype: DType) -> (VarMap, Model, Optimizer) {
        let vars = VarMap::new();
        let mut model = Model::new(config(), &vars, &Device::Cpu).unwrap();
        crate::model::tests::seed_vars(&vars, 3);
        model.set_compute_dtype(dtype);
        let modules = [
            TrainableModule::Vision,
            TrainableModule::Projector,
            TrainableModule::Llm,
        ];
        let mut opt = Optimizer::new(&vars, &modules, OptimizerKind::AdamW).unwrap();
        opt.loss_scale = LossScale::for_dtype(dtype);
        (vars, model, opt)
    }

    /// bf16 and f16 compute over f32 master weights: the same start and
    /// row as f32, every module training, twenty steps. The losses differ
    /// (half precision rounds) but stay within 3% of f32's, and fall as far;
    /// the weights and their optimizer state stay f32.
    #[test]
    fn half_precision_trains_within_a_tolerance_of_f32() {
        let row = image_row();
        let run = |dtype: DType| {
            let (vars, model, mut opt) = all_modules(dtype);
            let losses = repeat_step(&model, &mut opt, &row.row(), 20, 1e-2, 1.0);
            let data = vars.data().lock().unwrap();
            assert!(data.values().all(|v| v.dtype() == DType::F32));
            losses
        };
        let full = run(DType::F32);
        for dtype in [DType::BF16, DType::F16] {
            let half = run(dtype);
            assert_ne!(full, half, "{dtype:?} computed nothing in {dtype:?}");
            for (step, (f, h)) in full.iter().zip(&half).enumerate() {
                assert!(
                    (f - h).abs() <= 0.03 * f.abs(),
                    "step {step}: f32 {f}, {dtype:?} {h}"
                );
            }
            assert!(half[19] < half[0] * 0.5, "{dtype:?}: {half:?}");
        }
    }

    /// A loss scale so large that f16 gradients overflow: the step is
    /// skipped (no weight or moment changes), the scale halves; with a
    /// sound scale the next step trains.
    #[test]
    fn an_overflowing_f16_step_is_skipped_and_the_scale_backs_off() {
        let row = image_row();
        let (vars, model, mut opt) = all_modules(DType::F16);
        let huge = 2f64.powi(40);
        opt.loss_scale = Some(LossScale {
            scale: huge,
            good_steps: 7,
        });
        let before = snapshot(&vars);
        let names = vec!["sample".to_string()];
        let batch = [(row.row(), names.as_slice())];
        let rec = train_step(&model, &mut opt, &batch, &settings(1, 1e-2, 1.0)).unwrap();
        assert!(rec.skipped && !rec.grad_norm.is_finite(), "{rec:?}");
        assert_eq!(rec.loss_scale, Some(huge));
        assert_eq!(opt.step, 1);
        assert_eq!(snapshot(&vars), before, "a skipped step changed weights");
        let after = opt.loss_scale.unwrap();
        assert_eq!((after.scale, after.good_steps), (huge / 2.0, 0));
        opt.loss_scale = Some(LossScale::default());
        let rec = train_step(&model, &mut opt, &batch, &settings(1, 1e-2, 1.0)).unwrap();
        assert!(!rec.skipped && rec.grad_norm.is_finite(), "{rec:?}");
        assert_eq!(opt.step, 2);
        assert_ne!(snapshot(&vars), before);
    }

    #[test]
    fn module_names_select_the_hf_parameter_groups() {
        let m = |s: &str| vec![TrainableModule::parse(s).unwrap()];
        assert!(is_trainable(
            "llm.model.layers.0.self_attn.q_proj.lora_A.weight",
            &m("llm_lora")
        ));
        assert!(!is_trainable(
            "llm.model.layers.0.self_attn.q_proj.weight",
            &m("llm_lora")
        ));
        assert!(!is_trainable(
            "llm.model.layers.0.mlp.up_proj.weight",
            &m("llm_lora")
        ));
        assert!(is_trainable("llm.model.norm.weight", &m("norm")));
        assert!(!is_trainable(
            "vision_tower.vision_model.post_layernorm.weight",
            &m("norm")
        ));
        assert!(is_trainable("llm.lm_head.weight", &m("embed")));
    }

    /// One process on the CPU.
    fn settings(micro_batch: usize, lr: f64, clip: f64) -> StepSettings<'static> {
        StepSettings {
            micro_batch,
            ..StepSettings::new(lr, clip, &Device::Cpu, crate::dist::group())
        }
    }

    /// `steps` steps on one row; the losses.
    fn repeat_step(
        model: &Model,
        opt: &mut Optimizer,
        row: &Row,
        steps: usize,
        lr: f64,
        clip: f64,
    ) -> Vec<f64> {
        let names = vec!["sample".to_string()];
        (0..steps)
            .map(|_| {
                let batch = [(row.clone(), names.as_slice())];
                train_step(model, opt, &batch, &settings(1, lr, clip))
                    .unwrap()
                    .loss
            })
            .collect()
    }

    fn snapshot(vars: &VarMap) -> HashMap<String, Vec<f32>> {
        vars.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn accumulated_micro_batches_make_the_same_update_as_one_batch() {
        let device = Device::Cpu;
        let rows_data: Vec<(Vec<u32>, Vec<u8>)> = (0..4u32)
            .map(|r| {
                let ids: Vec<u32> = (0..7 + r).map(|i| (i * 5 + r * 3) % 18 + 1).collect();
                let mask = (0..ids.len())
                    .map(|i| u8::from(i > 1 + r as usize))
                    .collect();
                (ids, mask)
            })
            .collect();
        let names = vec!["s".to_string()];
        let run = |micro: usize| {
            let vars = VarMap::new();
            let model = Model::new(config(), &vars, &device).unwrap();
            crate::model::tests::seed_vars(&vars, 3);
            let mut opt =
                Optimizer::new(&vars, &[TrainableModule::Llm], OptimizerKind::AdamW).unwrap();
            let bounds: Vec<[u32; 2]> = rows_data
                .iter()
                .map(|(ids, _)| [0, ids.len() as u32])
                .collect();
            let rows: Vec<(Row, &[String])> = rows_data
                .iter()
                .zip(&bounds)
                .map(|((ids, mask), b)| {
                    (
                        Row {
                            input_ids: ids,
                            loss_mask: mask,
                            boundaries: b,
                            pixels: &[],
                        },
                        names.as_slice(),
                    )
                })
                .collect();
            let rec = train_step(&model, &mut opt, &rows, &settings(micro, 1e-2, 0.0)).unwrap();
            (rec, snapshot(&vars))
        };
        let (whole, after_whole) = run(4);
        let (split, after_split) = run(1);
        assert_eq!((whole.micro_batches, split.micro_batches), (1, 4));
        assert!(
            (whole.loss - split.loss).abs() < 1e-5,
            "{} vs {}",
            whole.loss,
            split.loss
        );
        assert!((whole.grad_norm - split.grad_norm).abs() < 1e-4 * whole.grad_norm);
        for (name, a) in &after_whole {
            let b = &after_split[name];
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name}: differs by {worst}");
        }
    }

    #[test]
    fn lora_trains_adapters_only_and_merging_keeps_the_function() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let mut model = Model::new(config(), &vars, &device).unwrap();
        crate::model::tests::seed_vars(&vars, 9);
        model.attach_lora(&vars, 2, 4.0, 1).unwrap();
        let before = snapshot(&vars);
        let modules = vec![TrainableModule::LlmLora];
        let mut opt = Optimizer::new(&vars, &modules, OptimizerKind::AdamW).unwrap();
        assert_eq!(opt.names().count(), 4 * 2, "A and B of q, k, v, o");
        assert!(opt.names().all(|n| n.contains(".lora_")));
        let ids: Vec<u32> = vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
        let mask = vec![1u8; 10];
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &[0, 10],
            pixels: &[],
        };
        let losses = repeat_step(&model, &mut opt, &row, 20, 2e-2, 0.0);
        assert!(losses[19] < losses[0] - 0.05, "{losses:?}");
        let trained = snapshot(&vars);
        for (name, values) in &before {
            if !name.contains(".lora_") {
                assert_eq!(
                    &trained[name], values,
                    "{name} is not an adapter but changed"
                );
            }
        }
        let unmerged = model
            .row_loss(&row, &device)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        model.merge_lora(&vars).unwrap();
        let merged_vars = snapshot(&vars);
        assert!(merged_vars.keys().all(|n| !n.contains(".lora_")));
        let q = "llm.model.layers.0.self_attn.q_proj.weight";
        assert_ne!(
            merged_vars[q], before[q],
            "merging changes the base weights"
        );
        let merged = model
            .row_loss(&row, &device)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (merged - unmerged).abs() < 1e-4 * unmerged.abs(),
            "{merged} vs {unmerged}"
        );
    }

    #[test]
    fn the_answer_learned_depends_on_the_image() {
        // Two samples with the same prompt and different images (all -1 vs
        // all +1 pixels) whose answers differ: only the image path can tell
        // them apart, so both losses fall only if media reach the decoder.
        let device = Device::Cpu;
        let vars = VarMap::new();
        let model = Model::new(config(), &vars, &device).unwrap();
        crate::model::tests::seed_vars(&vars, 11);
        let modules = [
            TrainableModule::Vision,
            TrainableModule::Projector,
            TrainableModule::Llm,
        ];
        let mut opt = Optimizer::new(&vars, &modules, OptimizerKind::AdamW).unwrap();
        let (dark, light) = (vec![-1.0f32; 3 * 64], vec![1.0f32; 3 * 64]);
        let (a, b) = (vec![1u32, 19, 2, 3, 4], vec![1u32, 19, 2, 3, 5]);
        let mask = [0u8, 0, 0, 0, 1];
        fn row<'a>(ids: &'a [u32], mask: &'a [u8], pixels: &'a [f32]) -> Row<'a> {
            Row {
                input_ids: ids,
                loss_mask: mask,
                boundaries: &[0, 5],
                pixels,
            }
        }
        let names = vec!["s".to_string()];
        for _ in 0..60 {
            let batch = [
                (row(&a, &mask, &dark), names.as_slice()),
                (row(&b, &mask, &light), names.as_slice()),
            ];
            train_step(&model, &mut opt, &batch, &settings(2, 1e-2, 1.0)).unwrap();
        }
        let loss = |r: Row| {
            model
                .row_loss(&r, &device)
                .unwrap()
                .0
                .to_scalar::<f32>()
                .unwrap()
        };
        let (la, lb) = (loss(row(&a, &mask, &dark)), loss(row(&b, &mask, &light)));
        // Without the image, the best is ln 2 = 0.69 for each.
        assert!(la < 0.2 && lb < 0.2, "{la} {lb}");
        // Swapping the images swaps the answers.
        assert!(loss(row(&a, &mask, &light)) > 1.0 && loss(row(&b, &mask, &dark)) > 1.0);
    }
}
