//! The VILA composition: media placeholders in a packed row widened to the
//! projector's tokens, text embedded, the decoder run over both; the loss,
//! per-token likelihoods and greedy generation on top.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use super::projector::Projector;
use super::qwen2::Decoder;
use super::recompute::Recompute;
use super::siglip::VisionTower;
use super::{Config, Row};
use crate::dist::SeqGroup;
use crate::ops;
use crate::seq_parallel::{SeqAttention, Shard, share_media};

/// The expanded sequence of a row: media placeholders widened to the
/// projector's tokens.
struct Expanded {
    /// Per expanded position: the text token id, or `None` for a media token.
    tokens: Vec<Option<u32>>,
    /// Loss weight of predicting each expanded position's token.
    mask: Vec<f32>,
    positions: Vec<u32>,
    /// Expanded boundaries.
    boundaries: Vec<usize>,
}

impl Expanded {
    fn new(row: &Row, image_token: u32, per_media: usize) -> Self {
        let mut e = Expanded {
            tokens: Vec::new(),
            mask: Vec::new(),
            positions: Vec::new(),
            boundaries: vec![0],
        };
        for w in row.boundaries.windows(2) {
            let start = e.tokens.len();
            for i in w[0] as usize..w[1] as usize {
                let id = row.input_ids[i];
                if id == image_token {
                    for _ in 0..per_media {
                        e.tokens.push(None);
                        e.mask.push(0.0);
                    }
                } else {
                    e.tokens.push(Some(id));
                    e.mask.push(f32::from(row.loss_mask[i]));
                }
            }
            e.positions.extend(0..(e.tokens.len() - start) as u32);
            e.boundaries.push(e.tokens.len());
        }
        e
    }
}

/// Rows of the LM head's logits that exist at a time under activation
/// checkpointing.
pub(crate) const HEAD_CHUNK: usize = 2048;

/// The VILA model: vision tower, projector and LLM.
pub struct Model {
    pub config: Config,
    /// The tower and projector (none for a text-only LLM).
    vision: Option<(VisionTower, Projector)>,
    llm: Decoder,
    /// Set: activation checkpointing ([`Model::set_gradient_checkpointing`]).
    recompute: Option<Arc<Recompute>>,
    /// What activations are computed in ([`Model::set_compute_dtype`]).
    dtype: DType,
    /// The sequence-parallel group each row is split over
    /// ([`Model::set_sequence_parallel`]; degree 1: none).
    seq: SeqGroup,
    /// Ring attention across the parts (else Ulysses).
    ring: bool,
}

impl Model {
    /// Creates the parameters in `vars` (randomly initialized where absent)
    /// and the model over them.
    pub fn new(config: Config, vars: &VarMap, device: &Device) -> Result<Self> {
        Self::build(config, VarBuilder::from_varmap(vars, DType::F32, device))
    }

    /// [`Model::new`] with every parameter not yet in `vars` created as
    /// zeros, for weights that are loaded or seeded next: drawing random
    /// values that are overwritten at once is wasted work (for a Qwen2-0.5B
    /// folder, 494M draws).
    pub fn unfilled(config: Config, vars: &VarMap, device: &Device) -> Result<Self> {
        let backend: Box<dyn SimpleBackend> = Box::new(Unfilled(vars.clone()));
        Self::build(
            config,
            VarBuilder::from_backend(backend, DType::F32, device.clone()),
        )
    }

    fn build(config: Config, vb: VarBuilder) -> Result<Self> {
        config
            .check()
            .map_err(|e| candle_core::Error::Msg(format!("model config: {}", e.0)))?;
        Ok(Model {
            vision: match &config.vision {
                Some(v) => Some((
                    VisionTower::new(
                        &vb.pp("vision_tower").pp("vision_model"),
                        v,
                        config.vision_layers_run(),
                    )?,
                    Projector::new(&vb.pp("mm_projector").pp("layers"), &config, v)?,
                )),
                None => None,
            },
            llm: Decoder::new(&vb.pp("llm"), &config)?,
            config,
            recompute: None,
            dtype: DType::F32,
            seq: SeqGroup::default(),
            ring: false,
        })
    }

    /// Splits each row over `seq`'s ranks (docs of `seq_parallel`): every
    /// rank of the group must train on the same rows, and the caller sums
    /// losses, token counts and gradients over the ranks.
    /// `ring`: the parts attend to each other by ring attention, else by
    /// Ulysses' all-to-all.
    pub fn set_sequence_parallel(&mut self, seq: SeqGroup, ring: bool) {
        self.seq = seq;
        self.ring = ring;
    }

    /// This rank's part of an expanded row, when rows are split.
    fn shard(&self, e: &Expanded) -> Option<Shard> {
        (self.seq.degree > 1).then(|| Shard::new(self.seq, self.ring, e.tokens.len()))
    }

    /// Adds rank-`r` LoRA adapters to the q, k, v and o projections of every
    /// decoder layer, as `...q_proj.lora_A.weight` / `lora_B.weight` in
    /// `vars` (kept if already there, as when resuming). Updates are scaled
    /// by `alpha / r`.
    pub fn attach_lora(&mut self, vars: &VarMap, r: usize, alpha: f64, seed: u64) -> Result<()> {
        self.llm.attach_lora(vars, r, alpha, seed)
    }

    /// Folds the adapters into the base weights (`W += scale * B A`) and
    /// removes them from `vars`: what is saved afterwards has the base
    /// model's names only.
    pub fn merge_lora(&mut self, vars: &VarMap) -> Result<()> {
        self.llm.merge_lora(vars)
    }

    /// Activation checkpointing: with `on`, each decoder layer and vision
    /// block keeps only its input in the forward pass and runs again in the
    /// backward pass, and [`Model::merge_recomputed`] must follow every
    /// `backward` of a loss. The gradients are the same as without it.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        let recompute = on.then(Arc::default);
        self.llm.recompute = recompute.clone();
        if let Some((tower, _)) = &mut self.vision {
            tower.recompute = recompute.clone();
        }
        self.recompute = recompute;
    }

    /// Computes activations in `dtype` (bf16: mixed precision): the
    /// parameters stay f32 (the optimizer's master weights, their gradients
    /// f32), each layer reads them cast to `dtype`; norms, softmaxes,
    /// attention's accumulation and the loss run in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// Whether activation checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.recompute.is_some()
    }

    /// Adds the parameter gradients that checkpointed blocks computed during
    /// the backward pass to that pass's `grads`; nothing without
    /// checkpointing.
    pub fn merge_recomputed(&self, grads: &mut GradStore) -> Result<()> {
        match &self.recompute {
            Some(r) => r.merge_into(grads),
            None => Ok(()),
        }
    }

    /// Changes the RoPE base (stage 4 raises it for longer contexts).
    pub fn set_rope_base(&mut self, base: f64) {
        self.llm.set_rope_base(base);
    }

    fn tower(&self) -> Result<&(VisionTower, Projector)> {
        self.vision.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("the model has no vision tower: it takes text only".into())
        })
    }

    /// Vision tower: `[N, 3, S, S]` pixels to `[N, P, Dv]` patch features.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.tower()?.0.forward(pixels)
    }

    /// Projector (`mlp_downsample`): `[N, P, Dv]` to `[N, tokens_per_media, H]`.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        self.tower()?.1.forward(features)
    }

    /// How many tokens of `row` carry loss (what [`Model::row_loss`] counts),
    /// without running the model.
    pub fn loss_tokens(&self, row: &Row) -> f32 {
        let c = &self.config;
        let e = Expanded::new(row, c.image_token, c.tokens_per_media());
        let shard = self.shard(&e);
        e.boundaries
            .windows(2)
            .flat_map(|w| w[0] + 1..w[1])
            .filter(|&j| e.tokens[j].is_some())
            // Position j - 1 predicts j: scored where j - 1 is.
            .filter(|&j| shard.is_none_or(|s| s.contains(j - 1)))
            .map(|j| e.mask[j])
            .sum()
    }

    /// The projected media tokens of a row's images, `[N, tokens, H]`.
    /// Split over a sequence-parallel group, each rank encodes its share
    /// and all get every image's tokens.
    fn media(&self, row: &Row, device: &Device, shard: Option<&Shard>) -> Result<Option<Tensor>> {
        let c = &self.config;
        let n_media = row
            .input_ids
            .iter()
            .filter(|&&t| t == c.image_token)
            .count();
        if n_media == 0 {
            return Ok(None);
        }
        let s = c.vision.as_ref().map_or(0, |v| v.image_size);
        let Some(pixels) = row.pixels.get(..n_media * 3 * s * s) else {
            return Err(candle_core::Error::Msg(format!(
                "the row has {n_media} media placeholders but pixels for {} images of {s} px",
                row.pixels.len() / (3 * s * s)
            )));
        };
        let encode = |pixels: &[f32], n: usize| -> Result<Tensor> {
            let px = Tensor::from_slice(pixels, (n, 3, s, s), device)?.to_dtype(self.dtype)?;
            self.project(&self.encode_images(&px)?)
        };
        let Some(shard) = shard else {
            return Ok(Some(encode(pixels, n_media)?));
        };
        let image = 3 * s * s;
        let mine: Vec<f32> = (0..n_media)
            .filter(|&i| shard.encodes(i))
            .flat_map(|i| pixels[i * image..(i + 1) * image].iter().copied())
            .collect();
        let local = match mine.len() / image {
            0 => None,
            n => Some(encode(&mine, n)?),
        };
        let shape = (c.tokens_per_media(), c.llm.hidden_size);
        Ok(Some(share_media(shard, local.as_ref(), n_media, shape)?))
    }

    /// Embeddings `[end - start, H]` of positions `range` of an expanded
    /// row whose media tokens are `media`: runs of text tokens gathered at
    /// once, media spliced in (an image may be cut by the range's ends).
    fn embed(
        &self,
        e: &Expanded,
        media: Option<&Tensor>,
        range: std::ops::Range<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let per_media = self.config.tokens_per_media();
        let mut parts = Vec::new();
        let mut i = range.start;
        let mut media_before = e.tokens[..i].iter().filter(|t| t.is_none()).count();
        while i < range.end {
            if e.tokens[i].is_none() {
                let Some(media) = media else {
                    return Err(candle_core::Error::Msg(
                        "media tokens without media".to_string(),
                    ));
                };
                let (m, offset) = (media_before / per_media, media_before % per_media);
                let len = (per_media - offset).min(range.end - i);
                parts.push(media.i(m)?.narrow(0, offset, len)?);
                media_before += len;
                i += len;
                continue;
            }
            let start = i;
            while i < range.end && e.tokens[i].is_some() {
                i += 1;
            }
            let ids: Vec<u32> = e.tokens[start..i].iter().flatten().copied().collect();
            parts.push(self.llm.embed_tokens(&ids, device)?.to_dtype(self.dtype)?);
        }
        if parts.is_empty() {
            return Tensor::zeros((0, self.config.llm.hidden_size), self.dtype, device);
        }
        Tensor::cat(&parts, 0)
    }

    /// Final hidden states (normed) of an expanded row whose media tokens
    /// are `media`: `[T, H]`, or with `shard`, `[shard.len, H]` for this
    /// rank's part (padding at its end).
    fn hidden(
        &self,
        e: &Expanded,
        media: Option<&Tensor>,
        shard: Option<&Shard>,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(s) = shard else {
            let x = self.embed(e, media, 0..e.tokens.len(), device)?;
            return self
                .llm
                .forward(x, &e.positions, &e.boundaries, SeqAttention::Whole);
        };
        let mut x = self.embed(e, media, s.start..s.end, device)?;
        let pad = s.len - (s.end - s.start);
        if pad > 0 {
            let zeros = Tensor::zeros((pad, self.config.llm.hidden_size), x.dtype(), device)?;
            x = Tensor::cat(&[&x, &zeros], 0)?;
        }
        let mut positions = e.positions[s.start..s.end].to_vec();
        positions.resize(s.len, 0);
        // The padding is a sample of its own, at the end of the row.
        let mut boundaries = e.boundaries.clone();
        if s.padded() > s.total {
            boundaries.push(s.padded());
        }
        self.llm.forward(x, &positions, &boundaries, s.attention())
    }

    /// Logits `[T, vocab]` of every position of one sample (`<image>`
    /// placeholders widened to their images' tokens, as the LLM sees them).
    pub fn logits(&self, ids: &[u32], pixels: &[f32], device: &Device) -> Result<Tensor> {
        let row = one_sample(ids, pixels);
        let c = &self.config;
        let e = Expanded::new(&row.row(), c.image_token, c.tokens_per_media());
        let media = self.media(&row.row(), device, None)?;
        self.llm
            .lm_head(&self.hidden(&e, media.as_ref(), None, device)?)
    }

    /// Negative log-likelihoods of the positions of a row that carry loss:
    /// position j predicts expanded position j + 1 within its sample, and
    /// only positions with a non-zero loss weight are scored (the LM head
    /// and softmax over the vocabulary are the largest cost of a step, and
    /// in SFT most positions have none). Returns the losses, their weights
    /// and their positions (ascending), and the expanded row.
    fn nll(&self, row: &Row, device: &Device) -> Result<(Tensor, Vec<f32>, Vec<usize>, Expanded)> {
        let c = &self.config;
        let e = Expanded::new(row, c.image_token, c.tokens_per_media());
        let shard = self.shard(&e);
        let media = self.media(row, device, shard.as_ref())?;
        let hidden = self.hidden(&e, media.as_ref(), shard.as_ref(), device)?;
        let (mut targets, mut weights, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for w in e.boundaries.windows(2) {
            for j in w[0]..w[1] - 1 {
                if let Some(next) = e.tokens[j + 1]
                    && e.mask[j + 1] > 0.0
                    && shard.is_none_or(|s| s.contains(j))
                {
                    targets.push(next);
                    weights.push(e.mask[j + 1]);
                    positions.push(j);
                }
            }
        }
        if positions.is_empty() {
            return Ok((Tensor::zeros(0, DType::F32, device)?, weights, positions, e));
        }
        // Rows of `hidden`: this rank's part starts at `shard.start`.
        let first = shard.map_or(0, |s| s.start);
        let index: Vec<u32> = positions.iter().map(|&p| (p - first) as u32).collect();
        let picked_hidden = hidden.index_select(&Tensor::new(index.as_slice(), device)?, 0)?;
        let targets = Tensor::new(targets.as_slice(), device)?;
        let n = index.len();
        let nll = match &self.recompute {
            // The logits are `[n, vocab]`: with checkpointing, only
            // HEAD_CHUNK rows of them exist at a time.
            Some(r) if n > HEAD_CHUNK => {
                let chunks = (0..n).step_by(HEAD_CHUNK).map(|at| {
                    let len = HEAD_CHUNK.min(n - at);
                    let (head, t) = (self.llm.lm_head.clone(), targets.narrow(0, at, len)?);
                    let params = head.params().collect();
                    let block = move |h: &Tensor| ops::cross_entropy(&head.forward(h)?, &t);
                    r.apply(&picked_hidden.narrow(0, at, len)?, params, Arc::new(block))
                });
                Tensor::cat(&chunks.collect::<Result<Vec<_>>>()?, 0)?
            }
            _ => ops::cross_entropy(&self.llm.lm_head(&picked_hidden)?, &targets)?,
        };
        Ok((nll, weights, positions, e))
    }

    /// Per-token losses of one packed row: (sum of masked cross-entropy,
    /// number of masked tokens), and the per-sample sums for tests.
    pub fn row_loss(&self, row: &Row, device: &Device) -> Result<(Tensor, f32, Vec<Tensor>)> {
        let (nll, weights, positions, e) = self.nll(row, device)?;
        let count = weights.iter().sum();
        if positions.is_empty() {
            let zero = Tensor::zeros((), DType::F32, device)?;
            let per_sample = vec![zero.clone(); e.boundaries.len() - 1];
            return Ok((zero, count, per_sample));
        }
        let weights_t = Tensor::new(weights.as_slice(), device)?;
        let nll = (nll * &weights_t)?;
        let per_sample = e
            .boundaries
            .windows(2)
            .map(|w| {
                let from = positions.partition_point(|&p| p < w[0]);
                let to = positions.partition_point(|&p| p < w[1]);
                if to > from {
                    nll.narrow(0, from, to - from)?.sum_all()
                } else {
                    Tensor::zeros((), DType::F32, device)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((nll.sum_all()?, count, per_sample))
    }

    /// Negative log-likelihood of each text token of a one-sample row given
    /// the tokens before it: entry k is the loss of token k + 1 (media
    /// placeholders must not occur; for perplexity of documents).
    pub fn token_nll(&self, ids: &[u32], device: &Device) -> Result<Vec<f32>> {
        let mask = vec![1u8; ids.len()];
        let bounds = [0, ids.len() as u32];
        let row = Row {
            input_ids: ids,
            loss_mask: &mask,
            boundaries: &bounds,
            pixels: &[],
        };
        let (nll, _, _, _) = self.nll(&row, device)?;
        nll.to_vec1()
    }

    /// Greedy decoding: the prompt `ids` (with `<image>` placeholders for
    /// `pixels`, as a sample), then up to `max_new` tokens, stopping after
    /// any of `stop`. Returns the new tokens.
    pub fn generate(
        &self,
        ids: &[u32],
        pixels: &[f32],
        max_new: usize,
        stop: &[u32],
        device: &Device,
    ) -> Result<Vec<u32>> {
        let greedy = Sampling::default();
        Ok(self
            .generate_with(ids, pixels, max_new, stop, &greedy, device)?
            .tokens)
    }

    /// Decoding with a KV cache: the prompt (media encoded once) runs
    /// through the LLM once, then each new token alone. Tokens are chosen as
    /// `sampling` says; each one's log-probability is under the model's
    /// own distribution (before temperature and top-p).
    pub fn generate_with(
        &self,
        ids: &[u32],
        pixels: &[f32],
        max_new: usize,
        stop: &[u32],
        sampling: &Sampling,
        device: &Device,
    ) -> Result<Generated> {
        let c = &self.config;
        let prompt = one_sample(ids, pixels);
        let e = Expanded::new(&prompt.row(), c.image_token, c.tokens_per_media());
        let media = self.media(&prompt.row(), device, None)?;
        let mut cache = self.llm.cache();
        let mut x = self.embed(&e, media.as_ref(), 0..e.tokens.len(), device)?;
        let mut out = Generated::default();
        let mut rng = sampling.seed;
        for _ in 0..max_new {
            let h = self.llm.forward_cached(x, &mut cache)?;
            let last = h.narrow(0, h.dim(0)? - 1, 1)?;
            let logits = self.llm.lm_head(&last)?.squeeze(0)?;
            let logits = logits.to_dtype(DType::F32)?;
            let log_probs: Vec<f32> = candle_nn::ops::log_softmax(&logits, 0)?.to_vec1()?;
            let next = sampling.pick(&log_probs, &mut rng);
            out.tokens.push(next);
            out.logprobs.push(log_probs[next as usize]);
            if stop.contains(&next) {
                break;
            }
            x = self
                .llm
                .embed_tokens(&[next], device)?
                .to_dtype(self.dtype)?;
        }
        Ok(out)
    }
}

/// A [`VarMap`] that creates missing parameters as zeros, whatever their
/// initialization hint.
struct Unfilled(VarMap);

impl SimpleBackend for Unfilled {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.0.get(shape, name, Init::Const(0.0), dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        SimpleBackend::get_unchecked(&self.0, name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// The tokens a generation made and their log-probabilities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// How the next token is chosen: greedy at temperature 0 (the default),
/// else drawn (seeded) from the softmax at `temperature` within the
/// smallest set of tokens whose probability reaches `top_p`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    fn pick(&self, log_probs: &[f32], rng: &mut u64) -> u32 {
        let argmax = || {
            log_probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let mut weighted: Vec<(u32, f64)> = log_probs
            .iter()
            .enumerate()
            .map(|(i, &lp)| (i as u32, (f64::from(lp) / self.temperature).exp()))
            .collect();
        weighted.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = weighted.iter().map(|w| w.1).sum();
        let mut kept = 0.0;
        let mut cut = weighted.len();
        for (i, w) in weighted.iter().enumerate() {
            kept += w.1 / total;
            if kept >= self.top_p {
                cut = i + 1;
                break;
            }
        }
        weighted.truncate(cut);
        let mass: f64 = weighted.iter().map(|w| w.1).sum();
        *rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let u = (lvpipe_pipeline::splitmix(*rng) >> 11) as f64 / (1u64 << 53) as f64 * mass;
        let mut acc = 0.0;
        for (id, w) in &weighted {
            acc += w;
            if u < acc {
                return *id;
            }
        }
        weighted.last().map_or_else(argmax, |w| w.0)
    }
}

/// One sample's ids and pixels, owning the mask and bounds a [`Row`] borrows.
struct OneSample<'a> {
    ids: &'a [u32],
    pixels: &'a [f32],
    mask: Vec<u8>,
    bounds: [u32; 2],
}

fn one_sample<'a>(ids: &'a [u32], pixels: &'a [f32]) -> OneSample<'a> {
    OneSample {
        ids,
        pixels,
        mask: vec![0; ids.len()],
        bounds: [0, ids.len() as u32],
    }
}

impl OneSample<'_> {
    fn row(&self) -> Row<'_> {
        Row {
            input_ids: self.ids,
            loss_mask: &self.mask,
            boundaries: &self.bounds,
            pixels: self.pixels,
        }
    }
}
