//! `answers.json`: every known answer of the corpus, the oracle that
//! evaluation scores a trained model against.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The known answers, written to `answers.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Answers {
    pub seed: u64,
    pub scale: String,
    /// Samples written per source name.
    pub counts: BTreeMap<String, u64>,
    /// The `kind` each source's samples get in shards.
    pub kinds: BTreeMap<String, String>,
    pub images: Vec<ImageFacts>,
    pub vqa: Vec<VqaItem>,
    pub needles: Vec<Needle>,
    /// Questions about the short clips (`video_sft.json`).
    #[serde(default)]
    pub video_vqa: Vec<VideoQaItem>,
    /// The shape that flashes in each long video (`longvideo.json`).
    #[serde(default)]
    pub video_needles: Vec<VideoNeedle>,
    /// The held-out evaluation set (`eval/`, in no source): every question
    /// of each image, of each clip, and each long video's needle.
    #[serde(default)]
    pub eval_vqa: Vec<VqaItem>,
    #[serde(default)]
    pub eval_video_vqa: Vec<VideoQaItem>,
    #[serde(default)]
    pub eval_video_needles: Vec<VideoNeedle>,
}

/// One question about a short clip and its answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VideoQaItem {
    pub id: String,
    pub video: String,
    pub attribute: String,
    pub question: String,
    pub answer: String,
}

/// A shape shown for two seconds somewhere in a long video.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VideoNeedle {
    pub id: String,
    pub video: String,
    /// Relative position of the needle's start in the video, 0 to 1.
    pub depth: f64,
    /// When it shows: `start_ms` <= t < `end_ms`.
    pub start_ms: i64,
    pub end_ms: i64,
    pub duration_ms: i64,
    pub colour: String,
    pub shape: String,
    pub question: String,
    pub answer: String,
}

/// What an image shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageFacts {
    /// Path relative to the output folder, or `pairs-000.tar!KEY.jpg`.
    pub file: String,
    pub colour: String,
    pub shape: String,
    pub count: u32,
    pub position: String,
}

/// One question of the SFT set and its answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqaItem {
    pub id: String,
    pub image: String,
    pub attribute: String,
    pub question: String,
    pub answer: String,
}

/// A planted fact in a long document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Needle {
    pub id: String,
    /// Relative position of the fact in the document, 0 to 1.
    pub depth: f64,
    pub question: String,
    pub answer: String,
}

impl Answers {
    pub const FILE_NAME: &'static str = "answers.json";

    /// Reads `answers.json` from a corpus folder.
    pub fn load(corpus: &std::path::Path) -> crate::Result<Self> {
        let path = corpus.join(Self::FILE_NAME);
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|e| crate::Error::Answers {
            path,
            message: e.to_string(),
        })
    }
}
