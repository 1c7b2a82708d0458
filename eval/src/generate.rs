//! `lvpipe generate`: a prompt (with images or videos) answered by any model
//! folder lvpipe loads, as a person trying a model uses it.

use std::path::PathBuf;
use std::time::Instant;

use lvpipe_schemas::FramePolicy;
use lvpipe_sharding::{Segment, SpecialTokens};
use lvpipe_trainer::model::Sampling;
use serde::Serialize;

use crate::{Error, Evaluator, Result};

/// What to generate from.
#[derive(Debug, Clone)]
pub struct GenerateSettings {
    /// A run folder, or a Hugging Face or VILA model folder.
    pub model: PathBuf,
    /// Another tokenizer than the folder's.
    pub tokenizer: Option<PathBuf>,
    pub prompt: String,
    pub images: Vec<PathBuf>,
    pub videos: Vec<PathBuf>,
    /// How frames are taken from each video.
    pub frames: FramePolicy,
    pub max_new_tokens: usize,
    /// The prompt as tokens are, without the chat template.
    pub raw: bool,
    pub sampling: Sampling,
    /// Where it computes: `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// What activations are computed in: `f32`, `bf16`, `f16`.
    pub dtype: String,
}

/// What `generate` made; `--json` prints it as it is.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    /// The log-probability of each generated token under the model.
    pub logprobs: Vec<f32>,
    /// Generated tokens per second, prompt included in the time.
    pub tokens_per_second: f64,
}

/// Loads the model and generates. Media come first in the user turn, one
/// `<image>` per image or video frame, as the training data has them.
pub fn generate(settings: &GenerateSettings) -> Result<Generation> {
    let device = lvpipe_trainer::device::parse(&settings.device)?;
    let mut ev = Evaluator::load_on(&settings.model, settings.tokenizer.as_deref(), &device)?;
    ev.compute_in(lvpipe_trainer::device::parse_dtype(&settings.dtype)?);
    let mut pixels = Vec::new();
    let mut media = 0;
    for path in &settings.images {
        pixels.extend(ev.image_pixels(path)?);
        media += 1;
    }
    for path in &settings.videos {
        let (n, frames) = ev.video_pixels(path, settings.frames)?;
        pixels.extend(frames);
        media += n;
    }
    if media > 0 && ev.model.config.vision.is_none() {
        return Err(Error::Input(format!(
            "{} is a text-only model; it takes no --image or --video",
            settings.model.display()
        )));
    }
    let content = format!(
        "{}{}",
        format!("{}\n", SpecialTokens::IMAGE).repeat(media),
        settings.prompt
    );
    let special = ev.tokenizer.special();
    let prompt_tokens = match settings.raw {
        true => ev.tokenizer.encode(&content)?,
        false => ev.tokenizer.encode_generation_prompt(&[Segment {
            role: "user",
            content,
        }])?,
    };
    let vocab = ev.model.config.llm.vocab_size;
    if let Some(t) = prompt_tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "the prompt has token {t} ({:?}), outside the model's vocabulary of {vocab}",
            ev.tokenizer.decode(&[*t]).unwrap_or_default()
        )));
    }
    let stop = [special.im_end, special.end_of_text];
    let started = Instant::now();
    let out = ev.model.generate_with(
        &prompt_tokens,
        &pixels,
        settings.max_new_tokens,
        &stop,
        &settings.sampling,
        &ev.device,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let shown: Vec<u32> = out
        .tokens
        .iter()
        .copied()
        .filter(|t| !stop.contains(t))
        .collect();
    Ok(Generation {
        text: ev.tokenizer.decode(&shown)?,
        tokens_per_second: out.tokens.len() as f64 / seconds.max(1e-9),
        prompt_tokens,
        tokens: out.tokens,
        logprobs: out.logprobs,
    })
}
