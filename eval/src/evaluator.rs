//! A trained stage loaded for evaluation: the model, its tokenizer, and the
//! held-out media prepared as training saw them.

use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;
use lvpipe_schemas::FramePolicy;
use lvpipe_sharding::{ChatTemplate, ChatTokenizer, Segment, SpecialTokens};
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
    /// Loads a model folder: a run folder (`config.json`, `model.safetensors`
    /// and the `tokenizer.json` it trained with), or a Hugging Face or VILA
    /// folder with its tokenizer (`tokenizer.json`, or `llm/tokenizer.json`).
    pub fn load(run: &Path) -> Result<Self> {
        Self::load_with(run, None)
    }

    /// [`Evaluator::load`] with another tokenizer than the folder's.
    pub fn load_with(run: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        Self::load_on(run, tokenizer, &Device::Cpu)
    }

    /// [`Evaluator::load_with`] computing on `device`.
    pub fn load_on(run: &Path, tokenizer: Option<&Path>, device: &Device) -> Result<Self> {
        let folder = lvpipe_trainer::hf::open(run)?;
        let path = match tokenizer {
            Some(p) => p.to_path_buf(),
            None => ["tokenizer.json", "llm/tokenizer.json"]
                .iter()
                .map(|f| run.join(f))
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::Input(format!(
                        "{}: no tokenizer.json (or llm/tokenizer.json); give one with --tokenizer",
                        run.display()
                    ))
                })?,
        };
        // A run says its template; a Hugging Face folder's tokenizer tells
        // its family by its tokens.
        let tokenizer = match &folder.saved {
            Some(saved) => {
                ChatTokenizer::load_with(&path, ChatTemplate::parse(&saved.chat_template)?)?
            }
            None => ChatTokenizer::load_family(&path)?,
        };
        if let Some(saved) = &folder.saved
            && tokenizer.fingerprint() != saved.tokenizer_fingerprint
        {
            return Err(Error::Input(format!(
                "{}: not the tokenizer the run trained with",
                path.display()
            )));
        }
        let mut config = folder.config(Some(tokenizer.special().image))?;
        if folder.saved.is_none() && tokenizer.vocab_size() > config.llm.vocab_size {
            // A stock tokenizer that gained media tokens: the model's
            // embedding grows to hold them, as for training.
            config.llm.vocab_size = tokenizer.vocab_size();
        }
        let device = device.clone();
        let vars = VarMap::new();
        let model = Model::unfilled(config.clone(), &vars, &device)?;
        lvpipe_trainer::hf::load_into(&vars, &folder)?;
        Ok(Evaluator {
            image_size: config.vision.as_ref().map_or(0, |v| v.image_size as u32),
            model,
            tokenizer,
            device,
            stage: folder.saved.as_ref().map_or(0, |s| s.stage),
        })
    }

    /// Computes activations in `dtype` (the weights stay as loaded, f32;
    /// norms, softmaxes and log-probabilities in f32).
    pub fn compute_in(&mut self, dtype: candle_core::DType) {
        self.model.set_compute_dtype(dtype);
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
        let frames = self.video_frames(path, policy)?;
        let n = frames.len();
        let mut pixels = Vec::new();
        for f in frames {
            pixels.extend(self.frame_pixels(path, f.rgb, f.width, f.height)?);
        }
        Ok((n, pixels))
    }

    /// The frames of a video under `policy`, decoded, as the build samples
    /// them.
    pub(crate) fn video_frames(
        &self,
        path: &Path,
        policy: FramePolicy,
    ) -> Result<Vec<lvpipe_sharding::video::Frame>> {
        use lvpipe_sharding::video::{Hints, VideoSettings};
        let settings = VideoSettings {
            policy,
            ..VideoSettings::default()
        };
        let sampled = lvpipe_sharding::video::sample(path, &settings, Hints::default())
            .map_err(|(_, message)| media_error(path, message))?;
        Ok(sampled.frames)
    }

    /// One decoded frame (packed RGB) of the video at `path` as the model
    /// sees it.
    pub(crate) fn frame_pixels(
        &self,
        path: &Path,
        rgb: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Result<Vec<f32>> {
        lvpipe_sharding::media::frame_training_pixels(rgb, width, height, self.image_size)
            .map_err(|(_, message)| media_error(path, message))
    }
}

fn media_error(path: &Path, message: String) -> Error {
    Error::Media {
        path: path.to_path_buf(),
        message,
    }
}
