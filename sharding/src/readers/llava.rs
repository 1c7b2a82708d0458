//! LLaVA/VILA annotations: `{"id", "image"|"video", "conversations"}` with
//! `<image>`/`<video>` placeholders, to samples.

use std::path::Path;

use lvpipe_schemas::{QuarantineReason, SampleKind};
use serde_json::Value;

use super::{
    Body, RawMedia, RawSample, Reject, annotation_id, check_alternation, check_reserved, with_id,
};
use crate::chat::{Segment, SpecialTokens};

/// A LLaVA/VILA annotation to a sample.
pub(super) fn llava_sample(value: Value, media_root: &Path) -> Body {
    let id = annotation_id(&value);
    llava_inner(&value, media_root)
        .map(|mut s| {
            s.annotation_id = id.clone();
            s
        })
        .map_err(|r| with_id(r, &id))
}

fn llava_inner(value: &Value, media_root: &Path) -> Body {
    let malformed = |m: &str| Reject::new(QuarantineReason::MalformedJson, m);
    let obj = value
        .as_object()
        .ok_or_else(|| malformed("an annotation must be a JSON object"))?;
    if let Some(key) = ["video", "video_path", "video_id"]
        .into_iter()
        .find(|k| obj.contains_key(*k))
    {
        return llava_video(obj, key, media_root);
    }
    let images: Vec<String> = match obj.get("image") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| malformed("`image` must be a path or a list of paths"))?,
        Some(_) => return Err(malformed("`image` must be a path or a list of paths")),
    };
    let mut segments = llava_turns(obj)?;
    let placeholders: usize = segments
        .iter()
        .map(|s| s.content.matches(SpecialTokens::IMAGE).count())
        .sum();
    let videos: usize = segments
        .iter()
        .map(|s| s.content.matches(SpecialTokens::VIDEO).count())
        .sum();
    if videos > 0 {
        return Err(Reject::new(
            QuarantineReason::PlaceholderMismatch,
            format!("{videos} `<video>` placeholder(s) but no `video` field"),
        ));
    }
    if placeholders == 0 && !images.is_empty() {
        // VILA's `preprocess_multimodal` puts the images before the first
        // human turn when the text does not place them; do the same.
        let first_user = segments
            .iter_mut()
            .find(|s| s.role == "user")
            .expect("checked alternation");
        first_user.content = format!("{}{}", "<image>\n".repeat(images.len()), first_user.content);
    } else if placeholders != images.len() {
        return Err(Reject::new(
            QuarantineReason::PlaceholderMismatch,
            format!(
                "{placeholders} `<image>` placeholder(s) but {} image(s) given",
                images.len()
            ),
        ));
    }
    let media = images
        .into_iter()
        .map(|written| RawMedia::File {
            path: media_root.join(&written),
            written,
        })
        .collect::<Vec<_>>();
    Ok(RawSample {
        annotation_id: None,
        kind: if media.is_empty() {
            SampleKind::Text
        } else {
            SampleKind::ImageText
        },
        turns: segments,
        media,
        tokens: None,
    })
}

/// The turns of a LLaVA annotation, checked.
fn llava_turns(obj: &serde_json::Map<String, Value>) -> std::result::Result<Vec<Segment>, Reject> {
    let malformed = |m: &str| Reject::new(QuarantineReason::MalformedJson, m);
    let turns = obj
        .get("conversations")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            malformed("missing `conversations` (a list of {\"from\", \"value\"} turns)")
        })?;
    let mut segments = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let from = turn.get("from").and_then(Value::as_str);
        let text = turn.get("value").and_then(Value::as_str);
        let (Some(from), Some(text)) = (from, text) else {
            return Err(malformed(&format!(
                "turn {i} needs string `from` and `value`"
            )));
        };
        let role = match from {
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            "system" if i == 0 => "system",
            other => {
                return Err(Reject::new(
                    QuarantineReason::NonAlternatingConversation,
                    format!("turn {i}: unknown or misplaced role `{other}`"),
                ));
            }
        };
        segments.push(Segment {
            role,
            content: text.to_string(),
        });
    }
    check_alternation(&segments)?;
    check_reserved(&segments)?;
    Ok(segments)
}

/// A VILA video annotation: `video` (or `video_path`, or `video_id` naming
/// `ID.mp4`), optional `fps` and `frame_count`, and one `<video>`
/// placeholder (put before the first human turn when the text has none).
fn llava_video(obj: &serde_json::Map<String, Value>, key: &str, media_root: &Path) -> Body {
    let malformed = |m: String| Reject::new(QuarantineReason::MalformedJson, m);
    let written = match obj.get(key) {
        Some(Value::String(s)) if key == "video_id" => format!("{s}.mp4"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if key == "video_id" => format!("{n}.mp4"),
        _ => return Err(malformed(format!("`{key}` must be a string"))),
    };
    if obj.get("image").is_some_and(|v| !v.is_null()) {
        return Err(malformed(format!(
            "both `image` and `{key}`: one sample is either an image or a video sample"
        )));
    }
    let number = |k: &str| -> std::result::Result<Option<f64>, Reject> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .map(Some)
                .ok_or_else(|| malformed(format!("`{k}` must be a positive number"))),
        }
    };
    let hints = crate::video::Hints {
        fps: number("fps")?,
        frame_count: number("frame_count")?.map(|f| f as u64),
    };
    let mut segments = llava_turns(obj)?;
    let count = |tag: &str| -> usize {
        segments
            .iter()
            .map(|s| s.content.matches(tag).count())
            .sum()
    };
    let (videos, images) = (count(SpecialTokens::VIDEO), count(SpecialTokens::IMAGE));
    if images > 0 || videos > 1 {
        return Err(Reject::new(
            QuarantineReason::PlaceholderMismatch,
            format!("{videos} `<video>` and {images} `<image>` placeholder(s) for one video"),
        ));
    }
    if videos == 0 {
        let first_user = segments
            .iter_mut()
            .find(|s| s.role == "user")
            .expect("checked alternation");
        first_user.content = format!("{}\n{}", SpecialTokens::VIDEO, first_user.content);
    }
    Ok(RawSample {
        annotation_id: None,
        kind: SampleKind::VideoQa,
        turns: segments,
        media: vec![RawMedia::Video {
            path: media_root.join(&written),
            written,
            hints,
        }],
        tokens: None,
    })
}
