//! One record made a sample: its media prepared as training will see them
//! (images resized and re-encoded, videos sampled into frames), the
//! template applied and tokenized, its content hash and sample id.

use std::borrow::Cow;
use std::path::Path;

use lvpipe_schemas::QuarantineReason;

use super::BuildSettings;
use crate::chat::{ChatTokenizer, Segment, SpecialTokens};
use crate::media::{encode_rgb, process_image};
use crate::readers::{RawMedia, RawSample, Reject};
use crate::video::{Hints, VideoSettings};
use crate::writer::{MediaItem, SampleRow, VideoInfo};

type Rejected<T> = std::result::Result<T, Reject>;

/// What a record's media became.
struct Media<'a> {
    items: Vec<MediaItem>,
    video: Option<VideoInfo>,
    /// The turns as tokenized: a video's placeholder widened to one
    /// `<image>` per frame.
    turns: Cow<'a, [Segment]>,
}

/// The sample of record `seq` (from `origin` in `source`) and its id, or
/// why it cannot be one.
pub(super) fn sample_row(
    raw: RawSample,
    seq: u64,
    origin: &str,
    source: &str,
    settings: &BuildSettings,
    video_settings: &VideoSettings,
    tokenizer: &ChatTokenizer,
) -> Rejected<(SampleRow, u128)> {
    let fail = |reason, detail: String| Reject {
        reason,
        detail,
        annotation_id: raw.annotation_id.clone(),
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(raw.kind.as_str().as_bytes());
    for turn in &raw.turns {
        for part in [turn.role, turn.content.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    let media = prepare_media(&raw, settings, video_settings, &mut hasher, &fail)?;
    let is_document = media.turns.iter().all(|t| t.role == "text");
    let encoded = if is_document {
        let text: String = media.turns.iter().map(|t| t.content.as_str()).collect();
        tokenizer.encode_document(&text)
    } else {
        tokenizer.encode_conversation(&media.turns)
    };
    let (input_ids, loss_mask) =
        encoded.map_err(|e| fail(QuarantineReason::MalformedJson, e.to_string()))?;
    let content_hash = hasher.finalize().to_hex()[..32].to_string();
    let sample_id = sample_id(source, &content_hash);
    let (items, video) = (media.items, media.video);
    let count = items.len() as u32;
    let row = SampleRow {
        seq,
        sample_id: format!("{sample_id:032x}"),
        source: source.to_string(),
        kind: raw.kind,
        origin: origin.to_string(),
        annotation_id: raw.annotation_id,
        content_hash,
        messages: raw.turns,
        num_images: if video.is_some() { 0 } else { count },
        num_frames: if video.is_some() { count } else { 0 },
        video,
        media: items,
        input_ids,
        loss_mask,
    };
    Ok((row, sample_id))
}

/// The id of a sample: its source and content, so the same content in
/// another source is another sample.
fn sample_id(source: &str, content_hash: &str) -> u128 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(source.as_bytes());
    hasher.update(&[0]);
    hasher.update(content_hash.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    u128::from_be_bytes(bytes)
}

/// Every media item of a record, prepared and hashed into `hasher`.
fn prepare_media<'a>(
    raw: &'a RawSample,
    settings: &BuildSettings,
    video_settings: &VideoSettings,
    hasher: &mut blake3::Hasher,
    fail: &dyn Fn(QuarantineReason, String) -> Reject,
) -> Rejected<Media<'a>> {
    let mut media = Media {
        items: Vec::with_capacity(raw.media.len()),
        video: None,
        turns: Cow::Borrowed(&raw.turns),
    };
    for (i, item) in raw.media.iter().enumerate() {
        let (bytes, label) = match item {
            RawMedia::Video {
                path,
                written,
                hints,
            } => {
                let label = format!("video `{written}`");
                let frames =
                    video_frames(path, &label, *hints, settings, video_settings, hasher, fail)?;
                media.items.extend(frames.0);
                media.turns = Cow::Owned(expand_video(&raw.turns, media.items.len()));
                media.video = Some(frames.1);
                continue;
            }
            RawMedia::Bytes(bytes) => (Cow::Borrowed(bytes), format!("image {i}")),
            RawMedia::File { path, written } => {
                let label = format!("image {i} (`{written}`)");
                (Cow::Owned(read_media(path, &label, fail)?), label)
            }
        };
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        let image = process_image(&bytes, &settings.image)
            .map_err(|(reason, detail)| fail(reason, format!("{label}: {detail}")))?;
        media.items.push(MediaItem::new(image, None));
    }
    Ok(media)
}

/// A media file's bytes; a missing one is `missing_media`.
fn read_media(
    path: &Path,
    label: &str,
    fail: &dyn Fn(QuarantineReason, String) -> Reject,
) -> Rejected<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail(
            QuarantineReason::MissingMedia,
            format!("{label}: {} not found", path.display()),
        ),
        _ => fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")),
    })
}

/// A video's sampled frames, stored as images are, and what it is; its
/// bytes are hashed into `hasher`.
fn video_frames(
    path: &Path,
    label: &str,
    hints: Hints,
    settings: &BuildSettings,
    video_settings: &VideoSettings,
    hasher: &mut blake3::Hasher,
    fail: &dyn Fn(QuarantineReason, String) -> Reject,
) -> Rejected<(Vec<MediaItem>, VideoInfo)> {
    let at =
        |(reason, detail): (QuarantineReason, String)| fail(reason, format!("{label}: {detail}"));
    let mut file = std::fs::File::open(path).map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::NotFound {
            QuarantineReason::MissingMedia
        } else {
            QuarantineReason::CorruptMedia
        };
        fail(reason, format!("{label}: {}: {e}", path.display()))
    })?;
    hasher
        .update_reader(&mut file)
        .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
    let sampled = crate::video::sample(path, video_settings, hints).map_err(at)?;
    let mut items = Vec::with_capacity(sampled.frames.len());
    for frame in sampled.frames {
        let image =
            encode_rgb(frame.rgb, frame.width, frame.height, &settings.image).map_err(at)?;
        items.push(MediaItem::new(
            image,
            Some((frame.index, frame.timestamp_ms)),
        ));
    }
    let info = VideoInfo {
        duration_ms: sampled.duration_ms,
        fps: sampled.fps,
        codec: sampled.codec,
    };
    Ok((items, info))
}

/// The turns with a video's placeholder widened to `frames` images, as VILA
/// expands a video: one `<image>` and a newline per frame. The stored
/// messages keep the annotation's text.
fn expand_video(turns: &[Segment], frames: usize) -> Vec<Segment> {
    let expanded = format!("{}\n", SpecialTokens::IMAGE).repeat(frames);
    turns
        .iter()
        .map(|t| Segment {
            role: t.role,
            content: t
                .content
                .replacen(&format!("{}\n", SpecialTokens::VIDEO), &expanded, 1)
                .replacen(SpecialTokens::VIDEO, &expanded, 1),
        })
        .collect()
}
