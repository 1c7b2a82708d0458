//! A trained stage loaded for evaluation: the model, its tokenizer, and the
//! held-out media prepared as training saw them.

use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;
use lvpipe_schemas::FramePolicy;
use lvpipe_sharding::{ChatTokenizer, Segment, SpecialTokens};
use lvpipe_trainer::SavedConfig;
use lvpipe_trainer::model::Model;

use crate::{Error, Result};

/// A loaded stage: model, tokenizer, device.
pub struct Evaluator {
    pub(crate) model: Model,
    pub(crate) tokenizer: ChatTokenizer,
    pub(crate) device: Device,
    image_size: u32,
    stage: usize,
}

impl Evaluator {
    /// Loads a run folder: `config.json`, `model.safetensors` and the
    /// `tokenizer.json` it trained with.
    pub fn load(run: &Path) -> Result<Self> {
        let saved = SavedConfig::load(run)?;
        let tokenizer = ChatTokenizer::load(&run.join("tokenizer.json"))?;
        if tokenizer.fingerprint() != saved.tokenizer_fingerprint {
            return Err(Error::Input(format!(
                "{}: tokenizer.json is not the one the run trained with",
                run.display()
            )));
        }
        let device = Device::Cpu;
        let mut vars = VarMap::new();
        let model = Model::new(saved.model.clone(), &vars, &device)?;
        let weights = run.join("model.safetensors");
        vars.load(&weights).map_err(|e| {
            Error::Input(format!(
                "{}: cannot load the weights: {e}",
                weights.display()
            ))
        })?;
        Ok(Evaluator {
            image_size: saved.model.vision.as_ref().map_or(0, |v| v.image_size as u32),
            model,
            tokenizer,
            device,
            stage: saved.stage,
        })
    }

    /// The curriculum stage the run trained.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// The prompt of one question about `media` images, ready to generate.
    pub(crate) fn prompt(&self, media: usize, question: &str) -> Result<Vec<u32>> {
        let content = format!(
            "{}{question}",
            format!("{}\n", SpecialTokens::IMAGE).repeat(media)
        );
        Ok(self.tokenizer.encode_generation_prompt(&[Segment {
            role: "user",
            content,
        }])?)
    }

    /// Greedy answer text (up to `<|im_end|>`).
    pub(crate) fn answer(&self, ids: &[u32], pixels: &[f32], max_new: usize) -> Result<String> {
        let end = self.tokenizer.special().im_end;
        let mut out = self
            .model
            .generate(ids, pixels, max_new, &[end], &self.device)?;
        if out.last() == Some(&end) {
            out.pop();
        }
        Ok(self.tokenizer.decode(&out)?)
    }

    /// An image file's pixels, as the build stores and the loader decodes it.
    pub(crate) fn image_pixels(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = fs_err::read(path)?;
        lvpipe_sharding::media::training_pixels(&bytes, self.image_size)
            .map_err(|(_, message)| media_error(path, message))
    }

    /// The frames of a video under `policy` (as the build samples them) and
    /// their pixels.
    pub(crate) fn video_pixels(
        &self,
        path: &Path,
        policy: FramePolicy,
    ) -> Result<(usize, Vec<f32>)> {
        use lvpipe_sharding::video::{Hints, VideoSettings};
        let settings = VideoSettings {
            policy,
            ..VideoSettings::default()
        };
        let sampled = lvpipe_sharding::video::sample(path, &settings, Hints::default())
            .map_err(|(_, message)| media_error(path, message))?;
        let n = sampled.frames.len();
        let mut pixels = Vec::new();
        for f in sampled.frames {
            let frame = lvpipe_sharding::media::frame_training_pixels(
                f.rgb,
                f.width,
                f.height,
                self.image_size,
            )
            .map_err(|(_, message)| media_error(path, message))?;
            pixels.extend(frame);
        }
        Ok((n, pixels))
    }
}

fn media_error(path: &Path, message: String) -> Error {
    Error::Media {
        path: path.to_path_buf(),
        message,
    }
}
