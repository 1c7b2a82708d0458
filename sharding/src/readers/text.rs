//! Text documents (`{"text"}` JSONL) and MMC4-style interleaved documents
//! (`{"text_list", "image_info"}`), to samples.

use std::path::Path;

use lvpipe_schemas::{QuarantineReason, SampleKind};
use serde_json::Value;

use super::{Body, RawMedia, RawSample, Reject, annotation_id, check_reserved, with_id};
use crate::chat::{Segment, SpecialTokens};

/// `{"text": ...}` to a document.
pub(super) fn text_sample(value: Value) -> Body {
    let id = annotation_id(&value);
    let text = value.get("text").and_then(Value::as_str).ok_or_else(|| {
        with_id(
            Reject::new(QuarantineReason::MalformedJson, "missing string `text`"),
            &id,
        )
    })?;
    if text.trim().is_empty() {
        return Err(with_id(
            Reject::new(QuarantineReason::EmptyDocument, "`text` is empty"),
            &id,
        ));
    }
    let turns = vec![Segment {
        role: "text",
        content: text.to_string(),
    }];
    check_reserved(&turns).map_err(|r| with_id(r, &id))?;
    check_no_placeholders(&turns[0].content).map_err(|r| with_id(r, &id))?;
    Ok(RawSample {
        annotation_id: id,
        kind: SampleKind::Text,
        turns,
        media: vec![],
        tokens: None,
    })
}

fn check_no_placeholders(text: &str) -> std::result::Result<(), Reject> {
    let n = text.matches(SpecialTokens::IMAGE).count() + text.matches(SpecialTokens::VIDEO).count();
    if n > 0 {
        return Err(Reject::new(
            QuarantineReason::PlaceholderMismatch,
            format!("{n} media placeholder(s) in text that has no media"),
        ));
    }
    Ok(())
}

/// An MMC4-style document: each image goes before the paragraph it matched.
pub(super) fn interleaved_sample(value: Value, media_root: &Path) -> Body {
    let id = annotation_id(&value);
    let malformed = |m: String| with_id(Reject::new(QuarantineReason::MalformedJson, m), &id);
    let texts: Vec<&str> = value
        .get("text_list")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_str).collect::<Option<_>>())
        .ok_or_else(|| malformed("missing `text_list` (a list of strings)".into()))?;
    if texts.iter().all(|t| t.trim().is_empty()) {
        return Err(with_id(
            Reject::new(QuarantineReason::EmptyDocument, "every paragraph is empty"),
            &id,
        ));
    }
    let infos = match value.get("image_info") {
        None | Some(Value::Null) => &vec![],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(malformed("`image_info` must be a list".into())),
    };
    let mut before: Vec<Vec<String>> = vec![Vec::new(); texts.len()];
    for (i, info) in infos.iter().enumerate() {
        let name = info.get("image_name").and_then(Value::as_str);
        let at = info.get("matched_text_index").and_then(Value::as_u64);
        match (name, at) {
            (Some(name), Some(at)) if (at as usize) < texts.len() => {
                before[at as usize].push(name.to_string())
            }
            _ => {
                return Err(malformed(format!(
                    "image_info[{i}] needs `image_name` and a `matched_text_index` below {}",
                    texts.len()
                )));
            }
        }
    }
    let mut content = String::new();
    let mut media = Vec::new();
    for (text, images) in texts.iter().zip(before) {
        for written in images {
            content.push_str(SpecialTokens::IMAGE);
            content.push('\n');
            media.push(RawMedia::File {
                path: media_root.join(&written),
                written,
            });
        }
        check_no_placeholders(text).map_err(|r| with_id(r, &id))?;
        content.push_str(text);
        content.push('\n');
    }
    let turns = vec![Segment {
        role: "text",
        content,
    }];
    check_reserved(&turns).map_err(|r| with_id(r, &id))?;
    Ok(RawSample {
        annotation_id: id,
        kind: SampleKind::Interleaved,
        turns,
        media,
        tokens: None,
    })
}
