//! One record made a sample: its media prepared as training will see them
//! (images resized and re-encoded, videos sampled into frames), the
//! template applied and tokenized, its content hash and sample id.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use lvpipe_schemas::QuarantineReason;

use super::BuildSettings;
use crate::chat::{ChatTokenizer, Segment, SpecialTokens};
use crate::media::{encode_rgb, process_image};
use crate::readers::{InputBytes, RawMedia, RawSample, Reject};
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
    prep: &Prep,
    tokenizer: &ChatTokenizer,
) -> Rejected<(SampleRow, u128)> {
    let fail = |reason, detail: String| Reject {
        reason,
        detail,
        annotation_id: raw.annotation_id.clone(),
    };
    if let Some(ids) = &raw.tokens {
        return token_row(&raw, ids, seq, origin, source, tokenizer.vocab_size());
    }
    let mut hasher = blake3::Hasher::new();
    hash_text(&mut hasher, &raw);
    let media = prepare_media(&raw, prep, &mut hasher, &fail)?;
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

/// The sample of a pre-tokenized record: its ids as they are, every token
/// in the loss; ids outside the tokenizer's vocabulary are rejected.
fn token_row(
    raw: &RawSample,
    ids: &[u32],
    seq: u64,
    origin: &str,
    source: &str,
    vocab: usize,
) -> Rejected<(SampleRow, u128)> {
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(Reject {
            reason: QuarantineReason::InvalidTokens,
            detail: format!(
                "`input_ids`[{i}] is {id}, outside the tokenizer's vocabulary of {vocab}"
            ),
            annotation_id: raw.annotation_id.clone(),
        });
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"tokens");
    for id in ids {
        hasher.update(&id.to_le_bytes());
    }
    let content_hash = hasher.finalize().to_hex()[..32].to_string();
    let sample_id = sample_id(source, &content_hash);
    let row = SampleRow {
        seq,
        sample_id: format!("{sample_id:032x}"),
        source: source.to_string(),
        kind: raw.kind,
        origin: origin.to_string(),
        annotation_id: raw.annotation_id.clone(),
        content_hash,
        messages: vec![],
        num_images: 0,
        num_frames: 0,
        video: None,
        media: vec![],
        input_ids: ids.to_vec(),
        loss_mask: vec![1; ids.len()],
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
    prep: &Prep,
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
                let frames = video_frames(path, &label, *hints, prep, hasher, fail)?;
                media.items.extend(frames.0);
                media.turns = Cow::Owned(expand_video(&raw.turns, media.items.len()));
                media.video = Some(frames.1);
                continue;
            }
            RawMedia::Bytes(bytes) => (Cow::Borrowed(bytes), format!("image {i}")),
            RawMedia::Member {
                archive,
                name,
                offset,
                size,
            } => {
                let label = format!("image {i} (member `{name}`)");
                let bytes = read_member(archive, *offset, *size)
                    .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
                prep.input.add_read(*size);
                (Cow::Owned(bytes), label)
            }
            RawMedia::File { path, written } => {
                let label = format!("image {i} (`{written}`)");
                (Cow::Owned(read_media(path, &label, prep, fail)?), label)
            }
        };
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        let image = process_image(&bytes, &prep.settings.image)
            .map_err(|(reason, detail)| fail(reason, format!("{label}: {detail}")))?;
        media.items.push(MediaItem::new(image, None));
    }
    Ok(media)
}

/// What a source's records are prepared with, resolved once per build:
/// its video settings and its canonical media root.
pub(super) struct SourcePrep {
    pub(super) video: VideoSettings,
    pub(super) root: PathBuf,
}

impl SourcePrep {
    pub(super) fn all(settings: &BuildSettings) -> crate::Result<Vec<SourcePrep>> {
        (0..settings.sources.len())
            .map(|i| {
                let root = settings.sources[i].media_root();
                // A source file named without a folder has the empty path
                // as its root: the current folder.
                let root = match root.as_os_str().is_empty() {
                    true => PathBuf::from("."),
                    false => root,
                };
                let root = std::fs::canonicalize(&root).map_err(|e| {
                    crate::Error::Config(format!(
                        "source `{}`: media root {}: {e}",
                        settings.sources[i].name,
                        root.display()
                    ))
                })?;
                Ok(SourcePrep {
                    video: settings.video_for(i)?,
                    root,
                })
            })
            .collect()
    }
}

/// How one record is prepared.
pub(super) struct Prep<'a> {
    pub(super) settings: &'a BuildSettings,
    /// The source's video settings (its frame policy).
    pub(super) video: VideoSettings,
    pub(super) root: MediaRoot<'a>,
    /// Counts the tar members this record reads.
    pub(super) input: &'a InputBytes,
}

/// Where a media file may be read from: inside the source's media root,
/// unless the build allows media anywhere.
pub(super) struct MediaRoot<'a> {
    /// Canonical ([`SourcePrep::all`] resolves it once per build).
    pub(super) root: &'a Path,
    pub(super) allow_outside: bool,
}

impl MediaRoot<'_> {
    /// `path` (as `written` in the annotation) checked before anything is
    /// opened: inside the root once symlinks are resolved, and a regular
    /// file (a FIFO would block the read forever, a device never end).
    /// Returns the resolved path and the file's size.
    fn check(
        &self,
        path: &Path,
        label: &str,
        fail: &dyn Fn(QuarantineReason, String) -> Reject,
    ) -> Rejected<(PathBuf, u64)> {
        let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => fail(
                QuarantineReason::MissingMedia,
                format!("{label}: {} not found", path.display()),
            ),
            _ => fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")),
        })?;
        if !self.allow_outside {
            let root = self.root;
            if !resolved.starts_with(root) {
                return Err(fail(
                    QuarantineReason::UnsafePath,
                    format!(
                        "{label}: {} is outside the media root {} (--allow-media-outside-root reads it anyway)",
                        resolved.display(),
                        root.display()
                    ),
                ));
            }
        }
        let meta = std::fs::metadata(&resolved)
            .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
        if !meta.is_file() {
            return Err(fail(
                QuarantineReason::UnsupportedMedia,
                format!(
                    "{label}: {} is not a regular file ({})",
                    resolved.display(),
                    file_kind(&meta)
                ),
            ));
        }
        Ok((resolved, meta.len()))
    }
}

/// What kind of file system object `meta` describes, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// `size` bytes of `archive` from `offset`: a tar member the reader passed.
fn read_member(archive: &Path, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0; size as usize];
    std::fs::File::open(archive)?
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => std::io::Error::new(
                e.kind(),
                format!("the archive ends inside the member's {size} bytes"),
            ),
            _ => e,
        })?;
    Ok(bytes)
}

/// A media file's bytes, at most `max_bytes` of them: larger files are
/// `media_too_large` before anything is read.
fn read_media(
    path: &Path,
    label: &str,
    prep: &Prep,
    fail: &dyn Fn(QuarantineReason, String) -> Reject,
) -> Rejected<Vec<u8>> {
    use std::io::Read;
    let max_bytes = prep.settings.image.limits.max_bytes;
    let (resolved, len) = prep.root.check(path, label, fail)?;
    let too_large = |n: u64| {
        fail(
            QuarantineReason::MediaTooLarge,
            format!("{label}: {n} bytes, more than the limit of {max_bytes} (--max-media-bytes)"),
        )
    };
    if len > max_bytes {
        return Err(too_large(len));
    }
    let file = std::fs::File::open(&resolved)
        .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A video's sampled frames, stored as images are, and what it is; its
/// bytes are hashed into `hasher`.
fn video_frames(
    path: &Path,
    label: &str,
    hints: Hints,
    prep: &Prep,
    hasher: &mut blake3::Hasher,
    fail: &dyn Fn(QuarantineReason, String) -> Reject,
) -> Rejected<(Vec<MediaItem>, VideoInfo)> {
    let at =
        |(reason, detail): (QuarantineReason, String)| fail(reason, format!("{label}: {detail}"));
    let (path, _) = prep.root.check(path, label, fail)?;
    let path = path.as_path();
    let mut file = std::fs::File::open(path)
        .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
    hasher
        .update_reader(&mut file)
        .map_err(|e| fail(QuarantineReason::CorruptMedia, format!("{label}: {e}")))?;
    let sampled = crate::video::sample(path, &prep.video, hints).map_err(at)?;
    let mut items = Vec::with_capacity(sampled.frames.len());
    for frame in sampled.frames {
        let image =
            encode_rgb(frame.rgb, frame.width, frame.height, &prep.settings.image).map_err(at)?;
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

/// Feeds a record's kind and turns (lengths and text) to `hasher`: the part
/// of a sample's content hash that comes before its media.
pub(super) fn hash_text(hasher: &mut blake3::Hasher, raw: &RawSample) {
    hasher.update(raw.kind.as_str().as_bytes());
    for turn in &raw.turns {
        for part in [turn.role, turn.content.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
}
