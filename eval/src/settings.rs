//! What to evaluate and how.

use std::fmt;
use std::path::PathBuf;

use lvpipe_schemas::FramePolicy;

use crate::{Error, Result};

/// An evaluation suite: an object of `eval.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Suite {
    /// Greedy answers to every question about the held-out images and clips.
    Vqa,
    /// A planted fact at depths 0 to 100% of filler documents of several
    /// lengths, retrieved by completing its sentence.
    NiahText,
    /// V-NIAH: a needle frame at depths 0 to 100% of haystacks of held-out
    /// video frames of several lengths; and the held-out long videos' own
    /// two-second flash, per depth and frame policy.
    NiahVideo,
    /// Perplexity of held-out filler documents by position range.
    Ppl,
}

impl Suite {
    pub const ALL: [Suite; 4] = [Suite::Vqa, Suite::NiahText, Suite::NiahVideo, Suite::Ppl];

    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Vqa => "vqa",
            Suite::NiahText => "niah_text",
            Suite::NiahVideo => "niah_video",
            Suite::Ppl => "ppl",
        }
    }

    /// `vqa,niah,ppl` -> the suites, in the order given (`niah` is both
    /// needle suites, `all` every suite).
    pub fn parse_list(text: &str) -> Result<Vec<Suite>> {
        let mut out = Vec::new();
        for s in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let suites: Vec<Suite> = match s {
                "all" => Suite::ALL.to_vec(),
                "niah" => vec![Suite::NiahText, Suite::NiahVideo],
                s => match Suite::ALL.into_iter().find(|k| k.as_str() == s) {
                    Some(suite) => vec![suite],
                    None => {
                        return Err(Error::Input(format!(
                            "unknown suite `{s}` (known: {}, niah, all)",
                            Suite::ALL.map(Suite::as_str).join(", ")
                        )));
                    }
                },
            };
            for suite in suites {
                if !out.contains(&suite) {
                    out.push(suite);
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// A stage's run folder (config.json, model.safetensors, tokenizer.json).
    pub run: PathBuf,
    /// The synthetic corpus (answers.json and its `eval/` media).
    pub data: PathBuf,
    pub suites: Vec<Suite>,
    /// Folder for eval.json and the heatmaps.
    pub out: PathBuf,
    /// At most this many questions of each kind (0: all).
    pub limit: usize,
    /// Document lengths (tokens) and depths (0 to 1) of the text needles.
    pub niah_lengths: Vec<usize>,
    pub niah_depths: Vec<f64>,
    /// Needles per (length, depth) cell.
    pub niah_trials: usize,
    /// V-NIAH haystack lengths (frames) and needle depths (0 to 1).
    pub vniah_frames: Vec<usize>,
    pub vniah_depths: Vec<f64>,
    /// Frame policies of the flash test (one heatmap row each).
    pub video_frames: Vec<FramePolicy>,
    /// Frame policy of the clip questions.
    pub clip_frames: FramePolicy,
    /// Where it computes: `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// What activations are computed in: `f32`, `bf16`, `f16`.
    pub dtype: String,
}

impl EvalSettings {
    /// The defaults of `lvpipe eval`: every question, needles at 256 to
    /// 2,048 tokens and depths 0 to 1, four per cell; V-NIAH haystacks of
    /// 16 to 128 frames, depths 0 to 1, one per held-out long video and
    /// cell; the flash test at LongVILA's 2 fps (at most 64 frames) and at
    /// 16 uniform frames; clips at 8 uniform frames, as stage 3 trains on
    /// them.
    pub fn new(
        run: impl Into<PathBuf>,
        data: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
        suites: Vec<Suite>,
    ) -> Self {
        EvalSettings {
            run: run.into(),
            data: data.into(),
            suites,
            out: out.into(),
            limit: 0,
            niah_lengths: vec![256, 512, 1024, 2048],
            niah_depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            niah_trials: 4,
            vniah_frames: vec![16, 32, 64, 128],
            vniah_depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            video_frames: vec![
                FramePolicy::Fps { fps: 2.0, max: 64 },
                FramePolicy::Uniform { frames: 16 },
            ],
            clip_frames: FramePolicy::Uniform { frames: 8 },
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }

    /// At most `limit` of `n` items (all when the limit is 0).
    pub(crate) fn take(&self, n: usize) -> usize {
        if self.limit == 0 {
            n
        } else {
            n.min(self.limit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_lists_expand_and_refuse_unknown_names() {
        assert_eq!(
            Suite::parse_list("vqa, niah,vqa").unwrap(),
            vec![Suite::Vqa, Suite::NiahText, Suite::NiahVideo]
        );
        assert_eq!(Suite::parse_list("all").unwrap(), Suite::ALL.to_vec());
        let err = Suite::parse_list("vqa,needles").unwrap_err().to_string();
        assert!(err.contains("unknown suite `needles`"), "{err}");
    }
}
