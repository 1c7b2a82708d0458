//! The typed reports of the suites, serialized as `eval.json`.

use serde::{Deserialize, Serialize};

use crate::Suite;

/// Everything one evaluation found; `eval.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The run folder evaluated.
    pub run: String,
    /// The curriculum stage it holds.
    pub stage: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa: Option<VqaReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub niah_text: Option<NiahTextReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub niah_video: Option<NiahVideoReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<PplReport>,
}

/// Greedy answers to the held-out questions about images and clips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaReport {
    /// Share of answers equal to the known one (case, article and final
    /// period ignored).
    pub accuracy: f64,
    /// What guessing among each question's answer classes would score.
    pub chance: f64,
    /// Questions asked.
    pub n: usize,
    /// By modality and attribute.
    pub table: Vec<VqaRow>,
    /// Up to 8 wrong answers as generated.
    pub misses: Vec<VqaMiss>,
}

/// VQA accuracy of one (modality, attribute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaRow {
    /// `image` or `video`.
    pub modality: String,
    /// `colour`, `shape`, `count`, `position` or `direction`.
    pub attribute: String,
    pub chance: f64,
    #[serde(flatten)]
    pub score: Score,
}

/// A wrong VQA answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaMiss {
    pub file: String,
    pub question: String,
    pub answer: String,
    pub generated: String,
}

/// Hits of a group of questions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Score {
    pub fn of(hits: impl IntoIterator<Item = bool>) -> Self {
        let (n, correct) = hits.into_iter().fold((0usize, 0usize), |(n, c), hit| {
            (n + 1, c + usize::from(hit))
        });
        Score {
            n,
            correct,
            accuracy: correct as f64 / n.max(1) as f64,
        }
    }
}

/// Text needles: retrieval of a planted fact by document length and depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiahTextReport {
    pub accuracy: f64,
    pub by_length: Vec<NiahLength>,
    /// By (length, depth): the heatmap's cells.
    pub table: Vec<NiahCell>,
    /// Up to 8 wrong answers as generated.
    pub misses: Vec<NiahMiss>,
}

impl NiahTextReport {
    /// The accuracy at `length` tokens, if it was measured.
    pub fn at(&self, length: usize) -> Option<f64> {
        self.by_length
            .iter()
            .find(|l| l.length == length)
            .map(|l| l.accuracy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NiahLength {
    pub length: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NiahCell {
    pub length: usize,
    pub depth: f64,
    #[serde(flatten)]
    pub score: Score,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiahMiss {
    pub length: usize,
    pub depth: f64,
    pub answer: String,
    pub generated: String,
}

/// Video needles. V-NIAH as LongVILA measures it: haystacks of frames from
/// held-out long videos, one needle frame (a coloured shape over a haystack
/// frame) inserted at a depth, the question about it; by haystack frames
/// and depth. Beside it, the held-out videos' own two-second flash, by frame
/// policy and depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiahVideoReport {
    /// V-NIAH accuracy over every cell; `None` when this lvpipe was built
    /// without the `video` feature.
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chance: Option<f64>,
    /// V-NIAH by (haystack frames, depth): the heatmap's cells.
    pub table: Vec<VniahCell>,
    /// Up to 8 wrong V-NIAH answers as generated.
    #[serde(default)]
    pub misses: Vec<VniahMiss>,
    /// The flash test's accuracy over every cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash_accuracy: Option<f64>,
    /// The flash test by (frame policy, depth).
    #[serde(default)]
    pub flash: Vec<NiahVideoCell>,
    /// Why the suite did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// V-NIAH hits with `frames` haystack frames (the needle frame is one
/// more) and the needle at `depth`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VniahCell {
    pub frames: usize,
    pub depth: f64,
    #[serde(flatten)]
    pub score: Score,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VniahMiss {
    pub frames: usize,
    pub depth: f64,
    /// The held-out video the haystack came from.
    pub video: String,
    pub answer: String,
    pub generated: String,
}

/// Flash-test hits of one frame policy and depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiahVideoCell {
    /// The frame policy.
    pub frames: String,
    pub depth: f64,
    /// Frames the policy took of this depth's videos.
    pub num_frames: Option<usize>,
    #[serde(flatten)]
    pub score: Score,
}

/// Perplexity of held-out documents, overall and by position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PplReport {
    /// The overall perplexity (the suite's headline number, as `accuracy` is
    /// for the others).
    pub accuracy: f64,
    pub perplexity: f64,
    pub documents: usize,
    pub table: Vec<PplRange>,
}

/// Perplexity of the tokens at positions `from..to`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PplRange {
    pub from: usize,
    pub to: usize,
    pub tokens: usize,
    pub perplexity: f64,
}

impl EvalReport {
    /// The headline number of `suite` (perplexity for `ppl`), if it ran.
    pub fn headline(&self, suite: Suite) -> Option<f64> {
        match suite {
            Suite::Vqa => self.vqa.as_ref().map(|r| r.accuracy),
            Suite::NiahText => self.niah_text.as_ref().map(|r| r.accuracy),
            Suite::NiahVideo => self.niah_video.as_ref().and_then(|r| r.accuracy),
            Suite::Ppl => self.ppl.as_ref().map(|r| r.perplexity),
        }
    }

    /// One line per suite that ran, for the terminal.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        for suite in Suite::ALL {
            let chance = match suite {
                Suite::Vqa => self.vqa.as_ref().map(|r| r.chance),
                Suite::NiahVideo => self.niah_video.as_ref().and_then(|r| r.chance),
                Suite::NiahText | Suite::Ppl => None,
            };
            let ran = match suite {
                Suite::Vqa => self.vqa.is_some(),
                Suite::NiahText => self.niah_text.is_some(),
                Suite::NiahVideo => self.niah_video.is_some(),
                Suite::Ppl => self.ppl.is_some(),
            };
            if !ran {
                continue;
            }
            let value = self.headline(suite).unwrap_or(f64::NAN);
            let line = match suite {
                Suite::Ppl => format!("ppl: {value:.2}\n"),
                _ => {
                    let chance = chance
                        .map(|c| format!(" (chance {:.1}%)", c * 100.0))
                        .unwrap_or_default();
                    format!("{suite}: {:.1}%{chance}\n", value * 100.0)
                }
            };
            text.push_str(&line);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_serialize_flat_and_read_back() {
        let report = EvalReport {
            run: "runs/stage-3".into(),
            stage: 3,
            vqa: Some(VqaReport {
                accuracy: 0.5,
                chance: 0.25,
                n: 2,
                table: vec![VqaRow {
                    modality: "image".into(),
                    attribute: "shape".into(),
                    chance: 1.0 / 3.0,
                    score: Score::of([true, false]),
                }],
                misses: vec![],
            }),
            ppl: Some(PplReport {
                accuracy: 3.0,
                perplexity: 3.0,
                documents: 4,
                table: vec![],
            }),
            ..EvalReport::default()
        };
        let json = serde_json::to_value(&report).unwrap();
        // The row's score is flat, as the first eval.json had it.
        assert_eq!(json["vqa"]["table"][0]["correct"], 1);
        assert_eq!(json["vqa"]["table"][0]["accuracy"], 0.5);
        assert!(json.get("niah_text").is_none());
        let back: EvalReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        assert_eq!(report.summary(), "vqa: 50.0% (chance 25.0%)\nppl: 3.00\n");
    }
}
