//! The Qwen2 decoder: token embedding, layers of RMSNorm, grouped-query
//! attention with RoPE (base per stage, optionally partial) and SwiGLU, a
//! final RMSNorm and the LM head, under `llm.model.*` and `llm.lm_head` as in
//! Qwen2 checkpoints inside a VILA folder. A packed row's samples stay apart:
//! positions restart and attention is causal within each sample.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};

use super::Config;
use super::init::reinit_one;
use super::layers::{Linear, Lora, RmsNorm};
use super::recompute::Recompute;
use super::rope::RopeSpec;
use crate::attention::Visible;
use crate::ops;
use crate::seq_parallel::SeqAttention;

/// Qwen2 decoder layer: RMSNorm, grouped-query attention with RoPE, SwiGLU.
#[derive(Clone)]
struct DecoderLayer {
    ln1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
}

impl DecoderLayer {
    pub(crate) fn new(vb: &VarBuilder, c: &Config) -> Result<Self> {
        let c = &c.llm;
        let (h, dh) = (c.hidden_size, c.head_dim());
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(DecoderLayer {
            ln1: RmsNorm::new(&vb.pp("input_layernorm"), h, c.rms_norm_eps)?,
            q: Linear::new(&a.pp("q_proj"), h, heads * dh, true)?,
            k: Linear::new(&a.pp("k_proj"), h, kv_heads * dh, true)?,
            v: Linear::new(&a.pp("v_proj"), h, kv_heads * dh, true)?,
            o: Linear::new(&a.pp("o_proj"), heads * dh, h, false)?,
            ln2: RmsNorm::new(&vb.pp("post_attention_layernorm"), h, c.rms_norm_eps)?,
            gate: Linear::new(&m.pp("gate_proj"), h, c.intermediate_size, false)?,
            up: Linear::new(&m.pp("up_proj"), h, c.intermediate_size, false)?,
            down: Linear::new(&m.pp("down_proj"), c.intermediate_size, h, false)?,
            heads,
            kv_heads,
        })
    }

    pub(crate) fn attention_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("q_proj", &mut self.q),
            ("k_proj", &mut self.k),
            ("v_proj", &mut self.v),
            ("o_proj", &mut self.o),
        ]
    }

    fn params(&self) -> Vec<Tensor> {
        let linears = [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ];
        let mut out: Vec<Tensor> = linears.into_iter().flat_map(Linear::params).collect();
        out.extend(self.ln1.params().into_iter().chain(self.ln2.params()));
        out
    }

    /// The attention's inputs for `x` `[T, H]`: queries stacked per KV head
    /// `[kv_heads, group * T, dh]` (grouped-query attention without copying
    /// K and V per query head: the `group` query heads of a KV head,
    /// consecutive as in Qwen2, form one matrix against that head's keys),
    /// and keys and values `[kv_heads, T, dh]`, rotated by `rope`.
    fn qkv(&self, x: &Tensor, rope: &Arc<ops::Rope>) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, hidden) = x.dims2()?;
        let dh = hidden / self.heads;
        let h = self.ln1.forward(x)?;
        let q = ops::rope_heads(&self.q.forward(&h)?, self.heads, rope)?;
        let k = ops::rope_heads(&self.k.forward(&h)?, self.kv_heads, rope)?;
        let v = self
            .v
            .forward(&h)?
            .reshape((t, self.kv_heads, dh))?
            .transpose(0, 1)?
            .contiguous()?;
        let group = self.heads / self.kv_heads;
        Ok((q.reshape((self.kv_heads, group * t, dh))?, k, v))
    }

    /// The rest of the block after attention gave `y` `[kv_heads, group *
    /// T, dh]` for input `x`: output projection, residual, SwiGLU MLP,
    /// residual.
    fn finish(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let y = y
            .reshape((self.heads, t, hidden / self.heads))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, hidden))?;
        let x = (x + self.o.forward(&y)?)?;
        let h = self.ln2.forward(&x)?;
        let mlp = self.down.forward(&ops::swiglu(
            &self.gate.forward(&h)?,
            &self.up.forward(&h)?,
        )?)?;
        x + mlp
    }

    /// `x` is [T, H]; `rope` holds the positions' angles; each query attends
    /// to the keys `visible` gives it.
    /// The block over `x` `[T, H]`; split by `seq`, `x` is this rank's part
    /// of a row split over a sequence-parallel group and `visible` covers
    /// the whole row.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &Arc<ops::Rope>,
        visible: &Arc<Visible>,
        seq: SeqAttention,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, rope)?;
        let dh = q.dim(2)?;
        let y = seq.attend(&q, &k, &v, visible, 1.0 / (dh as f32).sqrt())?;
        self.finish(x, y)
    }

    /// Inference over new positions `x` `[t, H]` that follow the `cache`'s:
    /// their keys and values join it, and each new query attends to every
    /// cached key and the new ones up to itself (one sample, causal).
    fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Arc<ops::Rope>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (q, k, v) = self.qkv(x, rope)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        let (rows, dh) = (q.dim(1)?, q.dim(2)?);
        let total = k.dim(1)?;
        let past = total - t;
        let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        // Query row r is new position r % t, at absolute position past + r % t.
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| {
                (0..total).map(move |key| match key <= past + r % t {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, total), x.device())?.to_dtype(scores.dtype())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let y = probs.matmul(&v)?;
        *cache = Some((k, v));
        self.finish(x, y)
    }
}

/// The keys and values of the positions decoded so far, per layer.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions held.
    pub len: usize,
}

/// The decoder over embeddings: what the LLM of a VILA model is.
pub(crate) struct Decoder {
    pub(crate) embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) rope: RopeSpec,
    /// Set: each layer recomputed in the backward pass.
    pub(crate) recompute: Option<Arc<Recompute>>,
}

impl Decoder {
    /// `vb` is at `llm`.
    pub(crate) fn new(vb: &VarBuilder, config: &Config) -> Result<Self> {
        let c = &config.llm;
        let embed = vb.pp("model").pp("embed_tokens").get_with_hints(
            (c.vocab_size, c.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::new(&vb.pp("model").pp("layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&vb.pp("model").pp("norm"), c.hidden_size, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            // One tensor in two places: both uses' gradients add up on it.
            Linear {
                w: embed.clone(),
                b: None,
                lora: None,
            }
        } else {
            Linear::new(&vb.pp("lm_head"), c.hidden_size, c.vocab_size, false)?
        };
        Ok(Decoder {
            embed,
            layers,
            norm,
            lm_head,
            rope: RopeSpec::new(c),
            recompute: None,
        })
    }

    /// Embeddings `[T, H]` of token ids.
    pub(crate) fn embed_tokens(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        self.embed.index_select(&Tensor::new(ids, device)?, 0)
    }

    /// Final hidden states `[T, H]` (normed) of embeddings `x` at
    /// `positions`, samples starting at `boundaries`. Split by `seq`, `x`
    /// and `positions` are this rank's part of a row split over a
    /// sequence-parallel group, and `boundaries` are the whole row's.
    pub(crate) fn forward(
        &self,
        mut x: Tensor,
        positions: &[u32],
        boundaries: &[usize],
        seq: SeqAttention,
    ) -> Result<Tensor> {
        let rope = Arc::new(self.rope.tables(positions));
        let visible = Arc::new(Visible::causal(sample_starts(boundaries)));
        for layer in &self.layers {
            x = match &self.recompute {
                Some(r) => {
                    let (l, rope, visible) = (layer.clone(), rope.clone(), visible.clone());
                    let block = Arc::new(move |x: &Tensor| l.forward(x, &rope, &visible, seq));
                    r.apply(&x, layer.params(), block)?
                }
                None => layer.forward(&x, &rope, &visible, seq)?,
            };
        }
        self.norm.forward(&x)
    }

    /// An empty cache for [`Decoder::forward_cached`].
    pub(crate) fn cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Final hidden states `[t, H]` of embeddings `x` that continue the
    /// sequence in `cache` (inference: no gradients are kept).
    pub(crate) fn forward_cached(&self, mut x: Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = x.dim(0)?;
        let positions: Vec<u32> = (cache.len as u32..(cache.len + t) as u32).collect();
        let rope = Arc::new(self.rope.tables(&positions));
        for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
            x = layer.forward_cached(&x, &rope, kv)?;
        }
        cache.len += t;
        self.norm.forward(&x)
    }

    /// Logits `[T, vocab]` of hidden states `[T, H]`.
    pub(crate) fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    pub(crate) fn set_rope_base(&mut self, base: f64) {
        self.rope.base = base;
    }

    /// See [`Model::attach_lora`](super::Model::attach_lora).
    pub(crate) fn attach_lora(
        &mut self,
        vars: &VarMap,
        r: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<()> {
        let device = self.embed.device().clone();
        let vb = VarBuilder::from_varmap(vars, DType::F32, &device);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = vb.pp(format!("llm.model.layers.{i}.self_attn"));
            for (name, lin) in layer.attention_mut() {
                let (out, inp) = lin.w.dims2()?;
                let p = a.pp(name);
                let full = format!("llm.model.layers.{i}.self_attn.{name}.lora_A.weight");
                let fresh = !vars
                    .data()
                    .lock()
                    .expect("var map lock")
                    .contains_key(&full);
                let la = p
                    .pp("lora_A")
                    .get_with_hints((r, inp), "weight", Init::Const(0.0))?;
                let lb = p
                    .pp("lora_B")
                    .get_with_hints((out, r), "weight", Init::Const(0.0))?;
                lin.lora = Some(Lora {
                    a: la,
                    b: lb,
                    scale: alpha / r as f64,
                });
                if fresh {
                    // A as PEFT initializes it (Kaiming-uniform), B zero.
                    reinit_one(vars, &full, seed, None)?;
                }
            }
        }
        Ok(())
    }

    /// See [`Model::merge_lora`](super::Model::merge_lora).
    pub(crate) fn merge_lora(&mut self, vars: &VarMap) -> Result<()> {
        let mut data = vars.data().lock().expect("var map lock");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, lin) in layer.attention_mut() {
                let Some(l) = lin.lora.take() else {
                    continue;
                };
                let base = format!("llm.model.layers.{i}.self_attn.{name}");
                let Some(var) = data.get(&format!("{base}.weight")) else {
                    return Err(candle_core::Error::Msg(format!("{base}.weight is missing")));
                };
                let merged = (var.as_tensor() + (l.b.matmul(&l.a)? * l.scale)?)?;
                var.set(&merged)?;
                data.remove(&format!("{base}.lora_A.weight"));
                data.remove(&format!("{base}.lora_B.weight"));
            }
        }
        Ok(())
    }
}

/// The first position of the sample each position of a packed row belongs
/// to: query `q` attends to keys `starts[q] ..= q`.
fn sample_starts(boundaries: &[usize]) -> Vec<u32> {
    let mut starts = Vec::with_capacity(*boundaries.last().unwrap_or(&0));
    for w in boundaries.windows(2) {
        starts.extend(std::iter::repeat_n(w[0] as u32, w[1] - w[0]));
    }
    starts
}
