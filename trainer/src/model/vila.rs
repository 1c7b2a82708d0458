//! The VILA composition: media placeholders in a packed row widened to the
//! projector's tokens, text embedded, the decoder run over both; the loss,
//! per-token likelihoods and greedy generation on top.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::projector::Projector;
use super::qwen2::Decoder;
use super::siglip::VisionTower;
use super::{Config, Row};
use crate::ops;

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

/// The VILA model: vision tower, projector and LLM.
pub struct Model {
    pub config: Config,
    vision: VisionTower,
    projector: Projector,
    llm: Decoder,
}

impl Model {
    /// Creates the parameters in `vars` (randomly initialized where absent)
    /// and the model over them.
    pub fn new(config: Config, vars: &VarMap, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_varmap(vars, DType::F32, device);
        Ok(Model {
            vision: VisionTower::new(&vb.pp("vision_tower").pp("vision_model"), &config)?,
            projector: Projector::new(&vb.pp("mm_projector").pp("layers"), &config)?,
            llm: Decoder::new(&vb.pp("llm"), &config)?,
            config,
        })
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

    /// Changes the RoPE base (stage 4 raises it for longer contexts).
    pub fn set_rope_base(&mut self, base: f64) {
        self.llm.set_rope_base(base);
    }

    /// Vision tower: `[N, 3, S, S]` pixels to `[N, P, Dv]` patch features.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    /// Projector (`mlp_downsample`): `[N, P, Dv]` to `[N, tokens_per_media, H]`.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        self.projector.forward(features)
    }

    /// How many tokens of `row` carry loss (what [`Model::row_loss`] counts),
    /// without running the model.
    pub fn loss_tokens(&self, row: &Row) -> f32 {
        let c = &self.config;
        let e = Expanded::new(row, c.image_token, c.tokens_per_media());
        e.boundaries
            .windows(2)
            .flat_map(|w| w[0] + 1..w[1])
            .filter(|&j| e.tokens[j].is_some())
            .map(|j| e.mask[j])
            .sum()
    }

    /// The projected media tokens of a row's images, `[N, tokens, H]`.
    fn media(&self, row: &Row, device: &Device) -> Result<Option<Tensor>> {
        let c = &self.config;
        let n_media = row
            .input_ids
            .iter()
            .filter(|&&t| t == c.image_token)
            .count();
        if n_media == 0 {
            return Ok(None);
        }
        let s = c.image_size;
        let Some(pixels) = row.pixels.get(..n_media * 3 * s * s) else {
            return Err(candle_core::Error::Msg(format!(
                "the row has {n_media} media placeholders but pixels for {} images of {s} px",
                row.pixels.len() / (3 * s * s)
            )));
        };
        let px = Tensor::from_slice(pixels, (n_media, 3, s, s), device)?;
        Ok(Some(self.project(&self.encode_images(&px)?)?))
    }

    /// Final hidden states `[T, H]` (normed) of an expanded row whose media
    /// tokens are `media`.
    fn hidden(&self, e: &Expanded, media: Option<&Tensor>, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let per_media = c.tokens_per_media();
        // Embeddings: runs of text tokens gathered at once, media spliced in.
        let mut parts = Vec::new();
        let (mut i, mut m) = (0, 0);
        while i < e.tokens.len() {
            if e.tokens[i].is_none() {
                let Some(media) = media else {
                    return Err(candle_core::Error::Msg(
                        "media tokens without media".to_string(),
                    ));
                };
                parts.push(media.i(m)?);
                m += 1;
                i += per_media;
                continue;
            }
            let start = i;
            while i < e.tokens.len() && e.tokens[i].is_some() {
                i += 1;
            }
            let ids: Vec<u32> = e.tokens[start..i].iter().flatten().copied().collect();
            parts.push(self.llm.embed_tokens(&ids, device)?);
        }
        let x = Tensor::cat(&parts, 0)?;
        self.llm.forward(x, &e.positions, &e.boundaries)
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
        let media = self.media(row, device)?;
        let hidden = self.hidden(&e, media.as_ref(), device)?;
        let (mut targets, mut weights, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for w in e.boundaries.windows(2) {
            for j in w[0]..w[1] - 1 {
                if let Some(next) = e.tokens[j + 1]
                    && e.mask[j + 1] > 0.0
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
        let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let picked_hidden = hidden.index_select(&Tensor::new(index.as_slice(), device)?, 0)?;
        let nll = ops::cross_entropy(
            &self.llm.lm_head(&picked_hidden)?,
            &Tensor::new(targets.as_slice(), device)?,
        )?;
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
    /// any of `stop`. Returns the new tokens. Media are encoded once.
    pub fn generate(
        &self,
        ids: &[u32],
        pixels: &[f32],
        max_new: usize,
        stop: &[u32],
        device: &Device,
    ) -> Result<Vec<u32>> {
        let c = &self.config;
        let mut seq = ids.to_vec();
        let mask = vec![0u8; ids.len() + max_new];
        let prompt_row = Row {
            input_ids: ids,
            loss_mask: &mask[..ids.len()],
            boundaries: &[0, ids.len() as u32],
            pixels,
        };
        let media = self.media(&prompt_row, device)?;
        let mut out = Vec::new();
        for _ in 0..max_new {
            let bounds = [0, seq.len() as u32];
            let row = Row {
                input_ids: &seq,
                loss_mask: &mask[..seq.len()],
                boundaries: &bounds,
                pixels,
            };
            let e = Expanded::new(&row, c.image_token, c.tokens_per_media());
            let h = self.hidden(&e, media.as_ref(), device)?;
            let last = h.narrow(0, h.dim(0)? - 1, 1)?;
            let logits = self.llm.lm_head(&last)?.squeeze(0)?;
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
            seq.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }
}
