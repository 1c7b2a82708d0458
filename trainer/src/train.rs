//! Training one stage: trainable modules, AdamW, warmup then cosine or
//! constant learning rate, global-norm clipping, masked loss, and a
//! non-finite guard that names the step and the samples.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result as CandleResult, Tensor, Var};
use candle_nn::VarMap;
use lvpipe_pipeline::recipe::Schedule;
use lvpipe_schemas::TrainableModule;

use crate::{Error, Result};

use crate::model::{Model, Row};
use crate::ops;

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

/// AdamW over the trainable parameters of a [`VarMap`]; its moments are
/// named like the parameters, for checkpoints.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: &VarMap, modules: &[TrainableModule]) -> CandleResult<Self> {
        let data = vars.data().lock().expect("var map lock");
        let mut trainable: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| is_trainable(name, modules))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for (name, var) in &trainable {
            m.insert(name.clone(), var.as_tensor().zeros_like()?);
            v.insert(name.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(AdamW {
            vars: trainable,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        })
    }

    /// Names of the parameters it updates.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(n, _)| n.as_str())
    }

    /// The trainable parameters' gradients out of a backward pass, in
    /// [`AdamW::names`] order (`None`: the loss does not depend on it).
    pub fn collect(&self, grads: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|(_, var)| grads.get(var.as_tensor()).cloned())
            .collect()
    }

    /// Global L2 norm of gradients given in [`AdamW::names`] order.
    pub fn grad_norm(&self, grads: &[Option<Tensor>]) -> CandleResult<f64> {
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(sq.sqrt())
    }

    /// One update with gradients (in [`AdamW::names`] order) scaled by
    /// `scale` (clipping). On CPU the moments and parameters are updated in
    /// place, three passes per parameter ([`ops::Moment`], [`ops::AdamStep`]);
    /// elsewhere with plain ops, which compute the same.
    pub fn update(&mut self, grads: &[Option<Tensor>], lr: f64, scale: f64) -> CandleResult<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        let decay = 1.0 - lr * self.weight_decay;
        for ((name, var), g) in self.vars.iter().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let theta = var.as_tensor();
            if theta.device().is_cpu() {
                let g = g.contiguous()?;
                let moment = |beta: f64, square| ops::Moment {
                    beta: beta as f32,
                    scale: scale as f32,
                    square,
                };
                self.m[name].inplace_op2(&g, &moment(b1, false))?;
                self.v[name].inplace_op2(&g, &moment(b2, true))?;
                let step = ops::AdamStep {
                    lr: lr as f32,
                    c1: c1 as f32,
                    c2: c2 as f32,
                    eps: self.eps as f32,
                    decay: decay as f32,
                };
                theta.inplace_op3(&self.m[name], &self.v[name], &step)?;
                continue;
            }
            let g = (g * scale)?;
            let m = ((&self.m[name] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&((theta * decay)? - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Drops the parameters (and moments) that are no longer in `vars`, as
    /// LoRA adapters after merging.
    pub fn forget_missing(&mut self, vars: &VarMap) {
        let data = vars.data().lock().expect("var map lock");
        self.vars.retain(|(name, _)| data.contains_key(name));
        self.m.retain(|name, _| data.contains_key(name));
        self.v.retain(|name, _| data.contains_key(name));
    }

    /// Restores moments saved by a checkpoint (`NAME.exp_avg`,
    /// `NAME.exp_avg_sq`) and the step count.
    /// `file` names the moments' file in errors.
    pub fn restore(
        &mut self,
        moments: &HashMap<String, Tensor>,
        step: u64,
        file: &Path,
    ) -> Result<()> {
        let bad = |message: String| Error::Checkpoint {
            path: file.to_path_buf(),
            message,
        };
        for (name, _) in &self.vars {
            for (suffix, map) in [("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)] {
                let key = format!("{name}.{suffix}");
                let t = moments
                    .get(&key)
                    .ok_or_else(|| bad(format!("the optimizer state has no `{key}`")))?;
                if t.dims() != map[name].dims() {
                    return Err(bad(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        map[name].dims()
                    )));
                }
                map.insert(name.clone(), t.clone());
            }
        }
        self.step = step;
        Ok(())
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

/// Forward and backward over `rows` (one global batch) in micro-batches of
/// `micro_batch` rows, gradients summed, then one update: the loss is the
/// mean over every masked token of the whole batch, whatever the split.
pub fn train_step(
    model: &Model,
    opt: &mut AdamW,
    rows: &[(Row, &[String])],
    micro_batch: usize,
    lr: f64,
    clip: f64,
    device: &Device,
) -> Result<StepRecord> {
    let this_step = opt.step + 1;
    let fail = |source: candle_core::Error| Error::Tensor {
        context: format!("step {this_step}"),
        source,
    };
    let count: f32 = rows.iter().map(|(row, _)| model.loss_tokens(row)).sum();
    let tokens: u64 = rows.iter().map(|(row, _)| row.input_ids.len() as u64).sum();
    let samples = |rows: &[(Row, &[String])]| -> String {
        rows.iter()
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut acc: Option<Vec<Option<Tensor>>> = None;
    let mut loss = 0f64;
    let mut passes = 0;
    for chunk in rows.chunks(micro_batch.max(1)) {
        let joined = JoinedRows::new(chunk.iter().map(|(row, _)| row));
        let part = model
            .row_loss(&joined.row(), device)
            .and_then(|(sum, _, _)| sum / f64::from(count.max(1.0)))
            .map_err(fail)?;
        let value = f64::from(part.to_scalar::<f32>().map_err(fail)?);
        if !value.is_finite() {
            return Err(Error::Diverged {
                step: opt.step + 1,
                loss: value,
                samples: samples(chunk),
            });
        }
        loss += value;
        passes += 1;
        let mut grads = part.backward().map_err(fail)?;
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
    let grads = acc.unwrap_or_default();
    let norm = opt.grad_norm(&grads).map_err(fail)?;
    if !norm.is_finite() {
        return Err(Error::Diverged {
            step: opt.step + 1,
            loss: norm,
            samples: format!("{} (the gradient norm)", samples(rows)),
        });
    }
    let scale = if clip > 0.0 && norm > clip {
        clip / norm
    } else {
        1.0
    };
    opt.update(&grads, lr, scale).map_err(fail)?;
    Ok(StepRecord {
        step: opt.step,
        loss,
        lr,
        grad_norm: norm,
        tokens,
        loss_tokens: f64::from(count),
        micro_batches: passes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use candle_core::DType;

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
        let mut opt = AdamW::new(&vars, &modules).unwrap();
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

    /// `steps` steps on one row; the losses.
    fn repeat_step(
        model: &Model,
        opt: &mut AdamW,
        row: &Row,
        steps: usize,
        lr: f64,
        clip: f64,
    ) -> Vec<f64> {
        let names = vec!["sample".to_string()];
        (0..steps)
            .map(|_| {
                let batch = [(row.clone(), names.as_slice())];
                train_step(model, opt, &batch, 1, lr, clip, &Device::Cpu)
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
            let mut opt = AdamW::new(&vars, &[TrainableModule::Llm]).unwrap();
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
            let rec = train_step(&model, &mut opt, &rows, micro, 1e-2, 0.0, &device).unwrap();
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
        let mut opt = AdamW::new(&vars, &modules).unwrap();
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
        let mut opt = AdamW::new(&vars, &modules).unwrap();
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
            train_step(&model, &mut opt, &batch, 2, 1e-2, 1.0, &device).unwrap();
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
    #[test]
    fn the_in_place_adamw_update_matches_its_formula() {
        let mut vars = VarMap::new();
        let theta0 = [0.5f32, -1.0, 2.0, 0.0];
        vars.get(
            4,
            "llm.w",
            candle_nn::Init::Const(0.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        vars.set_one("llm.w", Tensor::new(&theta0, &Device::Cpu).unwrap())
            .unwrap();
        let mut opt = AdamW::new(&vars, &[TrainableModule::Llm]).unwrap();
        opt.weight_decay = 0.1;
        let grads = [[0.3f32, -0.2, 0.0, 4.0], [-0.1, 0.5, 1.0, -2.0]];
        let (lr, scale, (b1, b2, eps)) = (0.01f64, 0.5f64, (0.9f64, 0.999f64, 1e-8f64));
        let (mut p, mut m, mut v) = (theta0.map(f64::from), [0f64; 4], [0f64; 4]);
        for (k, g) in grads.iter().enumerate() {
            let gt = Tensor::new(g, &Device::Cpu).unwrap();
            opt.update(&[Some(gt)], lr, scale).unwrap();
            let t = (k + 1) as i32;
            for i in 0..4 {
                let g = f64::from(g[i]) * scale;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let update =
                    (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps);
                p[i] = p[i] * (1.0 - lr * 0.1) - lr * update;
            }
        }
        let got = vars.data().lock().unwrap()["llm.w"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..4 {
            assert!(
                (f64::from(got[i]) - p[i]).abs() < 1e-6,
                "{got:?} against {p:?}"
            );
        }
        let m_got = opt.m["llm.w"].to_vec1::<f32>().unwrap();
        assert!((f64::from(m_got[3]) - m[3]).abs() < 1e-6);
    }
}
