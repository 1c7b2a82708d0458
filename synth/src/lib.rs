//! A seeded synthetic corpus in the real formats, with known answers: the
//! oracle of lvpipe's tests, benchmarks and demo.
//!
//! Images are coloured shapes (circle, square, triangle) in one of five
//! regions, one to three of them; captions and VQA state colour, shape, count
//! and position. Long documents carry planted facts ("needles") at known
//! depths; notes repeat themselves so that a model can learn to copy from its
//! context; videos (with the `video` feature, encoded by FFmpeg) show a moving
//! shape, or flash one for two seconds in a long video, with questions only
//! that moment answers. Every answer is
//! in `answers.json` ([`Answers`]), and a held-out set under `eval/` is in no
//! source, so a model trained on the corpus shows whether decode, tokenize,
//! mask, mix, pack, load and train are right. Same seed and scale, same bytes.
//!
//! ```no_run
//! use lvpipe_synth::{Scale, SynthSettings, synthesize};
//! # fn main() -> lvpipe_synth::Result<()> {
//! let summary = synthesize(&SynthSettings { out: "raw".into(), scale: Scale::Tiny, seed: 7 })?;
//! println!("{} files; sources in raw/registry.toml", summary.files);
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use lvpipe_schemas::SourceKind;
use serde::Serialize;

mod answers;
mod corpus;
#[cfg(feature = "video")]
pub mod encode;
mod formats;
mod scene;
mod text;
mod tokenizer;
#[cfg(feature = "video")]
mod videos;

pub use answers::{Answers, ImageFacts, Needle, VideoNeedle, VideoQaItem, VqaItem};
pub use scene::{VIDEO_NEEDLE_ANSWERS, draw_video_needle};
pub use text::{NEEDLE_NAMES, eval_needle, filler_sentences, needle_fact, needle_prompt};
pub use tokenizer::train_tokenizer;

/// How much to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Dozens of samples, small images: seconds, for tests.
    Tiny,
    /// Thousands of samples: the demo and benchmarks.
    Small,
}

pub(crate) struct Sizes {
    pub(crate) pretrain: usize,
    pub(crate) sft: usize,
    pub(crate) wds: usize,
    pub(crate) interleaved: usize,
    pub(crate) longdocs: usize,
    /// Notes that repeat themselves: short ones, and long ones whose
    /// recalls lie up to ~2,000 tokens after the facts.
    pub(crate) notes: (usize, usize),
    pub(crate) image_side: (u32, u32),
    pub(crate) long_words: (usize, usize),
    pub(crate) vocab: usize,
    /// Codes common enough to be single tokens (the catalogue of `text`).
    pub(crate) catalogue: usize,
    /// Held-out evaluation set: images, short clips, long videos.
    pub(crate) eval: (usize, usize, usize),
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    pub(crate) videos: VideoSizes,
}

#[cfg_attr(not(feature = "video"), allow(dead_code))]
pub(crate) struct VideoSizes {
    pub(crate) clips: usize,
    pub(crate) clip_side: (u32, u32),
    pub(crate) long: usize,
    pub(crate) long_side: (u32, u32),
    /// Lengths of the long videos: training ones anywhere in the range,
    /// held-out ones at its end.
    pub(crate) long_seconds: (u32, u32),
}

impl Scale {
    pub(crate) fn sizes(self) -> Sizes {
        match self {
            Scale::Tiny => Sizes {
                pretrain: 48,
                sft: 16,
                wds: 12,
                interleaved: 6,
                longdocs: 6,
                notes: (40, 64),
                image_side: (48, 96),
                long_words: (300, 600),
                vocab: 1024,
                catalogue: 16,
                eval: (8, 2, 2),
                videos: VideoSizes {
                    clips: 8,
                    clip_side: (64, 48),
                    long: 3,
                    long_side: (64, 48),
                    long_seconds: (4, 64),
                },
            },
            Scale::Small => Sizes {
                pretrain: 1200,
                sft: 1200,
                wds: 600,
                interleaved: 300,
                longdocs: 300,
                notes: (24_000, 1_600),
                image_side: (160, 320),
                long_words: (1500, 6000),
                vocab: 4096,
                catalogue: 512,
                eval: (200, 40, 10),
                videos: VideoSizes {
                    clips: 240,
                    clip_side: (128, 96),
                    long: 240,
                    long_side: (96, 72),
                    long_seconds: (4, 120),
                },
            },
        }
    }
}

/// What to synthesize and where.
#[derive(Debug, Clone)]
pub struct SynthSettings {
    pub out: PathBuf,
    pub scale: Scale,
    pub seed: u64,
}

/// Source names synth writes, with their kind and file.
pub const SOURCES: [(&str, SourceKind, &str); 6] = [
    ("pretrain", SourceKind::Llava, "pretrain.json"),
    ("sft", SourceKind::Llava, "sft.json"),
    ("pairs-000", SourceKind::Wds, "pairs-000.tar"),
    ("interleaved", SourceKind::Interleaved, "interleaved.jsonl"),
    ("longdocs", SourceKind::Text, "longdocs.jsonl"),
    ("notes", SourceKind::Text, "notes.jsonl"),
];

/// Video sources synth writes when built with FFmpeg (the `video` feature),
/// with the frame policy the registry gives each: short clips as stage 3
/// uses them, long videos at LongVILA's 2 fps cap.
pub const VIDEO_SOURCES: [(&str, &str, &str); 2] = [
    ("video_sft", "video_sft.json", "uniform:8"),
    ("longvideo", "longvideo.json", "fps:2,max:64"),
];

/// What synth wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub answers: Answers,
    pub files: usize,
    pub bytes: u64,
}

/// Errors of synthesis: the output folder cannot be written, or an encoder
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("image encoding: {0}")]
    Image(#[from] image::ImageError),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// FFmpeg could not write a video.
    #[error("FFmpeg could not write {path}: {message}")]
    Video { path: PathBuf, message: String },
    #[error(transparent)]
    Schema(#[from] lvpipe_schemas::Error),
    /// An `answers.json` that does not parse.
    #[error("{path}: {message}")]
    Answers { path: PathBuf, message: String },
    /// An argument outside what the corpus knows.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes the corpus into `settings.out`: the sources, `eval/`, the
/// tokenizer, `registry.toml` and `answers.json`.
pub fn synthesize(settings: &SynthSettings) -> Result<SynthSummary> {
    corpus::write(settings)
}
