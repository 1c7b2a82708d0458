//! The optimizers a stage chooses with `optimizer = "adamw" | "adamw8bit" |
//! "adafactor"`, over the trainable parameters of a `VarMap`, their state
//! named like the parameters for checkpoints.
//!
//! | optimizer   | state per parameter                 | checkpoint names                          |
//! |-------------|-------------------------------------|-------------------------------------------|
//! | `adamw`     | two f32 moments: 8 bytes            | `NAME.exp_avg`, `NAME.exp_avg_sq`         |
//! | `adamw8bit` | two 8-bit moments: 2 bytes + 1/32   | `NAME.exp_avg.codes`, `NAME.exp_avg.absmax`, the same for `exp_avg_sq` |
//! | `adafactor` | a row and a column mean per matrix  | `NAME.exp_avg_sq_row`, `NAME.exp_avg_sq_col` (`NAME.exp_avg_sq` for vectors) |
//!
//! `adamw8bit` keeps f32 moments for tensors under 4,096 values (norms,
//! biases), as bitsandbytes does; `adafactor` is Hugging Face's with an
//! external learning rate (`relative_step = False`, `scale_parameter =
//! False`, no first moment).

mod adafactor;
mod adamw8bit;
mod loss_scale;
pub mod quantized;

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result as CandleResult, Tensor, Var};
use candle_nn::VarMap;
pub use lvpipe_pipeline::recipe::OptimizerKind;
use lvpipe_schemas::TrainableModule;

use crate::ops;
use crate::train::is_trainable;
use crate::{Error, Result};
pub use loss_scale::LossScale;
use quantized::Quantized;

/// Tensors smaller than this keep f32 moments under `adamw8bit`
/// (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// One parameter's optimizer state.
enum State {
    Adam {
        m: Tensor,
        v: Tensor,
    },
    Adam8bit {
        m: Quantized,
        v: Quantized,
    },
    /// Adafactor's second moment: row and column means for a matrix, the
    /// full moment for a vector.
    Factored {
        row: Tensor,
        col: Tensor,
    },
    Unfactored {
        v: Tensor,
    },
}

/// The optimizer of a stage.
pub struct Optimizer {
    pub kind: OptimizerKind,
    vars: Vec<(String, Var)>,
    state: HashMap<String, State>,
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Dynamic loss scaling, for f16 compute ([`LossScale`]).
    pub loss_scale: Option<LossScale>,
}

impl Optimizer {
    pub fn new(
        vars: &VarMap,
        modules: &[TrainableModule],
        kind: OptimizerKind,
    ) -> CandleResult<Self> {
        let data = vars.data().lock().expect("var map lock");
        let mut trainable: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| is_trainable(name, modules))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        let mut state = HashMap::new();
        for (name, var) in &trainable {
            state.insert(name.clone(), State::fresh(kind, var.as_tensor())?);
        }
        Ok(Optimizer {
            kind,
            vars: trainable,
            state,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            loss_scale: None,
        })
    }

    /// Names of the parameters it updates.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(n, _)| n.as_str())
    }

    /// The shapes of the parameters it updates, in [`Optimizer::names`] order.
    pub fn shapes(&self) -> Vec<candle_core::Shape> {
        self.vars
            .iter()
            .map(|(_, var)| var.as_tensor().shape().clone())
            .collect()
    }

    /// The trainable parameters' gradients out of a backward pass, in
    /// [`Optimizer::names`] order (`None`: the loss does not depend on it).
    pub fn collect(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|(_, var)| grads.get(var.as_tensor()).cloned())
            .collect()
    }

    /// Global L2 norm of gradients given in [`Optimizer::names`] order.
    pub fn grad_norm(&self, grads: &[Option<Tensor>]) -> CandleResult<f64> {
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += f64::from(
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            );
        }
        Ok(sq.sqrt())
    }

    /// One update with gradients (in [`Optimizer::names`] order) scaled by
    /// `scale` (clipping).
    pub fn update(&mut self, grads: &[Option<Tensor>], lr: f64, scale: f64) -> CandleResult<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let adam = AdamStep {
            lr,
            scale,
            b1,
            b2,
            c1: 1.0 - b1.powi(t),
            c2: 1.0 - b2.powi(t),
            eps: self.eps,
            decay: 1.0 - lr * self.weight_decay,
        };
        for ((name, var), g) in self.vars.iter().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            match self.state.get_mut(name).expect("state of every parameter") {
                State::Adam { m, v } => adam.apply(var, &g, m, v)?,
                State::Adam8bit { m, v } => adamw8bit::update(var, &g, m, v, &adam)?,
                state => {
                    adafactor::update(var, &g, state, self.step, lr, scale, self.weight_decay)?
                }
            }
        }
        Ok(())
    }

    /// Counts a step whose gradients overflowed under loss scaling: no
    /// weight or moment changes (the bias corrections of later steps count
    /// it, a difference of one step's in `1 - beta^t`).
    pub fn skip(&mut self) {
        self.step += 1;
    }

    /// Drops the parameters (and their state) that are no longer in `vars`,
    /// as LoRA adapters after merging.
    pub fn forget_missing(&mut self, vars: &VarMap) {
        let data = vars.data().lock().expect("var map lock");
        self.vars.retain(|(name, _)| data.contains_key(name));
        self.state.retain(|name, _| data.contains_key(name));
    }

    /// The state as a checkpoint stores it (names in the module docs).
    pub fn state_tensors(&self) -> CandleResult<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, state) in &self.state {
            for (suffix, t) in state.tensors()? {
                out.insert(format!("{name}.{suffix}"), t);
            }
        }
        Ok(out)
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> CandleResult<usize> {
        Ok(self
            .state_tensors()?
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum())
    }

    /// Restores the state saved by a checkpoint ([`Optimizer::state_tensors`])
    /// and the step count; `file` names the state's file in errors.
    pub fn restore(
        &mut self,
        saved: &HashMap<String, Tensor>,
        step: u64,
        file: &Path,
    ) -> Result<()> {
        let bad = |message: String| Error::Checkpoint {
            path: file.to_path_buf(),
            message,
        };
        for (name, _) in &self.vars {
            let state = &self.state[name];
            let mut restored = HashMap::new();
            for (suffix, fresh) in state.tensors().map_err(|e| bad(e.to_string()))? {
                let key = format!("{name}.{suffix}");
                let t = saved.get(&key).ok_or_else(|| {
                    bad(format!(
                        "the optimizer state has no `{key}` (was it saved by another optimizer than {}?)",
                        self.kind.as_str()
                    ))
                })?;
                if t.dims() != fresh.dims() || t.dtype() != fresh.dtype() {
                    return Err(bad(format!(
                        "`{key}` is {:?} {:?}, {} expects {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        self.kind.as_str(),
                        fresh.dtype(),
                        fresh.dims()
                    )));
                }
                // A copy: AdamW updates its moments in place, which must not
                // reach the caller's tensors.
                let t = t
                    .to_device(fresh.device())
                    .and_then(|t| t.copy())
                    .map_err(|e| bad(e.to_string()))?;
                restored.insert(suffix, t);
            }
            let state = State::from_tensors(state, restored).map_err(|e| bad(e.to_string()))?;
            self.state.insert(name.clone(), state);
        }
        self.step = step;
        Ok(())
    }
}

impl State {
    fn fresh(kind: OptimizerKind, theta: &Tensor) -> CandleResult<Self> {
        let zeros = || Tensor::zeros(theta.shape(), DType::F32, theta.device());
        let n = theta.elem_count();
        Ok(match kind {
            OptimizerKind::AdamW => State::Adam {
                m: zeros()?,
                v: zeros()?,
            },
            OptimizerKind::AdamW8bit if n < MIN_8BIT_SIZE => State::Adam {
                m: zeros()?,
                v: zeros()?,
            },
            OptimizerKind::AdamW8bit => State::Adam8bit {
                m: Quantized::zeros(n, true),
                v: Quantized::zeros(n, false),
            },
            OptimizerKind::Adafactor => match theta.dims() {
                [.., rows, cols] => {
                    let lead = &theta.dims()[..theta.rank() - 2];
                    let shape = |last: usize| [lead, &[last]].concat();
                    State::Factored {
                        row: Tensor::zeros(shape(*rows), DType::F32, theta.device())?,
                        col: Tensor::zeros(shape(*cols), DType::F32, theta.device())?,
                    }
                }
                _ => State::Unfactored { v: zeros()? },
            },
        })
    }

    /// The state's tensors by checkpoint suffix.
    fn tensors(&self) -> CandleResult<Vec<(&'static str, Tensor)>> {
        let cpu = candle_core::Device::Cpu;
        Ok(match self {
            State::Adam { m, v } => vec![("exp_avg", m.clone()), ("exp_avg_sq", v.clone())],
            State::Adam8bit { m, v } => vec![
                ("exp_avg.codes", Tensor::new(m.codes.as_slice(), &cpu)?),
                ("exp_avg.absmax", Tensor::new(m.absmax.as_slice(), &cpu)?),
                ("exp_avg_sq.codes", Tensor::new(v.codes.as_slice(), &cpu)?),
                ("exp_avg_sq.absmax", Tensor::new(v.absmax.as_slice(), &cpu)?),
            ],
            State::Factored { row, col } => vec![
                ("exp_avg_sq_row", row.clone()),
                ("exp_avg_sq_col", col.clone()),
            ],
            State::Unfactored { v } => vec![("exp_avg_sq", v.clone())],
        })
    }

    /// A state of `like`'s kind from checked tensors by suffix.
    fn from_tensors(like: &State, mut t: HashMap<&'static str, Tensor>) -> CandleResult<Self> {
        let mut take = |k: &str| t.remove(k).expect("checked by restore");
        Ok(match like {
            State::Adam { .. } => State::Adam {
                m: take("exp_avg"),
                v: take("exp_avg_sq"),
            },
            State::Adam8bit { .. } => {
                let mut q = |k: &str, signed| -> CandleResult<Quantized> {
                    Ok(Quantized {
                        codes: take(&format!("{k}.codes")).to_vec1()?,
                        absmax: take(&format!("{k}.absmax")).to_vec1()?,
                        signed,
                    })
                };
                State::Adam8bit {
                    m: q("exp_avg", true)?,
                    v: q("exp_avg_sq", false)?,
                }
            }
            State::Factored { .. } => State::Factored {
                row: take("exp_avg_sq_row"),
                col: take("exp_avg_sq_col"),
            },
            State::Unfactored { .. } => State::Unfactored {
                v: take("exp_avg_sq"),
            },
        })
    }
}

/// One AdamW step's constants.
pub(crate) struct AdamStep {
    pub lr: f64,
    /// Clipping's factor on the gradient.
    pub scale: f64,
    pub b1: f64,
    pub b2: f64,
    /// Bias corrections `1 - beta^t`.
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
    /// `1 - lr * weight_decay`.
    pub decay: f64,
}

impl AdamStep {
    /// AdamW on f32 moments. On CPU the moments and parameter are updated
    /// in place, three passes per parameter ([`ops::Moment`],
    /// [`ops::AdamStep`]); elsewhere with plain ops, which compute the same.
    fn apply(&self, var: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor) -> CandleResult<()> {
        let theta = var.as_tensor();
        if theta.device().is_cpu() && theta.dtype() == DType::F32 {
            let g = g.contiguous()?;
            let moment = |beta: f64, square| ops::Moment {
                beta: beta as f32,
                scale: self.scale as f32,
                square,
            };
            m.inplace_op2(&g, &moment(self.b1, false))?;
            v.inplace_op2(&g, &moment(self.b2, true))?;
            let step = ops::AdamStep {
                lr: self.lr as f32,
                c1: self.c1 as f32,
                c2: self.c2 as f32,
                eps: self.eps as f32,
                decay: self.decay as f32,
            };
            return theta.inplace_op3(m, v, &step);
        }
        let g = (g * self.scale)?;
        *m = ((&*m * self.b1)? + (&g * (1.0 - self.b1))?)?;
        *v = ((&*v * self.b2)? + (g.sqr()? * (1.0 - self.b2))?)?;
        let update = ((&*m / self.c1)? / ((&*v / self.c2)?.sqrt()? + self.eps)?)?;
        let theta32 = theta.to_dtype(DType::F32)?;
        let next = ((theta32 * self.decay)? - (update * self.lr)?)?;
        var.set(&next.to_dtype(theta.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// A var map with one trainable parameter `llm.w` of `values`.
    fn one_parameter(values: &[f32], shape: &[usize]) -> VarMap {
        let mut vars = VarMap::new();
        vars.get(
            shape,
            "llm.w",
            candle_nn::Init::Const(0.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let t = Tensor::from_slice(values, shape, &Device::Cpu).unwrap();
        vars.set_one("llm.w", t).unwrap();
        vars
    }

    fn values(vars: &VarMap) -> Vec<f32> {
        vars.data().lock().unwrap()["llm.w"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
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
        let mut opt = Optimizer::new(&vars, &[TrainableModule::Llm], OptimizerKind::AdamW).unwrap();
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
        let m_got = opt.state_tensors().unwrap()["llm.w.exp_avg"]
            .to_vec1::<f32>()
            .unwrap();
        assert!((f64::from(m_got[3]) - m[3]).abs() < 1e-6);
    }

    /// AdamW8bit is AdamW on moments that are decoded before and encoded
    /// after each step; its parameter follows that formula, computed here
    /// from the same code books.
    #[test]
    fn the_8bit_adamw_update_matches_its_formula() {
        let n = MIN_8BIT_SIZE + 300;
        let theta0: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
            .collect();
        let vars = one_parameter(&theta0, &[n]);
        let mut opt =
            Optimizer::new(&vars, &[TrainableModule::Llm], OptimizerKind::AdamW8bit).unwrap();
        opt.weight_decay = 0.01;
        let (lr, scale, (b1, b2, eps)) = (0.01f32, 0.5f32, (0.9f32, 0.999f32, 1e-8f32));
        let (mut p, mut m, mut v) = (
            theta0.clone(),
            Quantized::zeros(n, true),
            Quantized::zeros(n, false),
        );
        for step in 1..=3 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 13 + step * 7) % 29) as f32 / 29.0 - 0.4)
                .collect();
            let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
            opt.update(&[Some(gt)], f64::from(lr), f64::from(scale))
                .unwrap();
            let (mut mf, mut vf) = (m.decode(), v.decode());
            let t = step as i32;
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            for i in 0..n {
                let g = g[i] * scale;
                mf[i] = b1 * mf[i] + (1.0 - b1) * g;
                vf[i] = b2 * vf[i] + (1.0 - b2) * g * g;
                p[i] = p[i] * (1.0 - lr * 0.01) - lr * (mf[i] / c1) / ((vf[i] / c2).sqrt() + eps);
            }
            (m, v) = (Quantized::encode(&mf, true), Quantized::encode(&vf, false));
        }
        let got = values(&vars);
        let worst = got
            .iter()
            .zip(&p)
            .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
        assert!(worst < 1e-6, "{worst}");
        // It stays near full-precision AdamW over these steps.
        assert!(got.iter().zip(&theta0).any(|(a, b)| a != b));
        let state = opt.state_tensors().unwrap();
        assert_eq!(state["llm.w.exp_avg.codes"].dtype(), DType::U8);
        assert_eq!(
            state["llm.w.exp_avg.codes"].to_vec1::<u8>().unwrap(),
            m.codes
        );
        // 2 bytes and two block maxima per 256 values, against AdamW's 8.
        let bytes = opt.state_bytes().unwrap();
        assert_eq!(bytes, 2 * n + 2 * 4 * n.div_ceil(quantized::BLOCK));
    }

    /// Adafactor against Hugging Face's, on a matrix (factored) and a vector
    /// over three steps (fixtures/optim/adafactor.json, from
    /// benches/tools/optimizer_fixtures.py).
    #[test]
    fn adafactor_matches_hugging_face() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/optim/adafactor.json"
        );
        let f: serde_json::Value =
            serde_json::from_str(&fs_err::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        for which in ["matrix", "vector"] {
            let shape: Vec<usize> = f["shapes"][which]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let vars = one_parameter(&floats(&f["start"][which]), &shape);
            let mut opt =
                Optimizer::new(&vars, &[TrainableModule::Llm], OptimizerKind::Adafactor).unwrap();
            opt.weight_decay = f["settings"]["weight_decay"].as_f64().unwrap();
            let lr = f["settings"]["lr"].as_f64().unwrap();
            for (step, g) in f["grads"].as_array().unwrap().iter().enumerate() {
                let g =
                    Tensor::from_vec(floats(&g[which]), shape.as_slice(), &Device::Cpu).unwrap();
                opt.update(&[Some(g)], lr, 1.0).unwrap();
                let want = floats(&f["after"][step][which]);
                let got = values(&vars);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{which} step {}: {got:?} against {want:?}",
                        step + 1
                    );
                }
            }
            let names: Vec<String> = opt.state_tensors().unwrap().into_keys().collect();
            let factored = which == "matrix";
            assert_eq!(
                names.iter().any(|n| n.ends_with("exp_avg_sq_row")),
                factored
            );
        }
    }

    /// Each optimizer's state goes into a checkpoint's tensors and comes back
    /// the same: the next updates are those of an optimizer that never
    /// stopped. A state of another optimizer is refused by name.
    #[test]
    fn every_optimizer_state_round_trips_through_its_tensors() {
        let n = MIN_8BIT_SIZE + 8 * 9;
        let theta0: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let grad = |s: usize| {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i + s) % 11) as f32 / 11.0 - 0.45)
                .collect();
            Tensor::from_vec(g, &[8, n / 8][..], &Device::Cpu).unwrap()
        };
        for kind in [
            OptimizerKind::AdamW,
            OptimizerKind::AdamW8bit,
            OptimizerKind::Adafactor,
        ] {
            let (a, mut b) = (
                one_parameter(&theta0, &[8, n / 8]),
                one_parameter(&theta0, &[8, n / 8]),
            );
            let mut first = Optimizer::new(&a, &[TrainableModule::Llm], kind).unwrap();
            for s in 0..2 {
                first.update(&[Some(grad(s))], 1e-2, 1.0).unwrap();
            }
            // The second starts from the first's weights and saved state.
            let now = a.data().lock().unwrap()["llm.w"]
                .as_tensor()
                .copy()
                .unwrap();
            b.set_one("llm.w", now).unwrap();
            let mut second = Optimizer::new(&b, &[TrainableModule::Llm], kind).unwrap();
            let saved = first.state_tensors().unwrap();
            second
                .restore(&saved, first.step, Path::new("optimizer.safetensors"))
                .unwrap();
            for s in 2..4 {
                first.update(&[Some(grad(s))], 1e-2, 1.0).unwrap();
                second.update(&[Some(grad(s))], 1e-2, 1.0).unwrap();
            }
            assert_eq!(values(&a), values(&b), "{}", kind.as_str());
            let other = match kind {
                OptimizerKind::AdamW => OptimizerKind::Adafactor,
                _ => OptimizerKind::AdamW,
            };
            let mut wrong = Optimizer::new(&b, &[TrainableModule::Llm], other).unwrap();
            let err = wrong
                .restore(&saved, 2, Path::new("optimizer.safetensors"))
                .unwrap_err();
            assert!(err.to_string().contains("has no"), "{err}");
        }
    }
}
