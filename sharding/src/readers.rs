//! Source readers: raw files to numbered records, or to rejections.
//!
//! Readers only parse annotations and check their structure; media files are
//! opened later, in parallel, by the processing stage. Every record a reader
//! meets is emitted exactly once, as a [`RawSample`] or a [`Reject`], with an
//! origin that names the file and the line, element or tar member.

use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lvpipe_schemas::{QuarantineReason, SampleKind};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::Value;

use crate::chat::{Segment, SpecialTokens};
use crate::source::{SourceKind, SourceSpec};
use crate::{Error, Result};

/// A record that passed the structural checks; media not yet read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawSample {
    pub annotation_id: Option<String>,
    pub kind: SampleKind,
    /// Template roles; documents are one `text` segment.
    pub turns: Vec<Segment>,
    pub media: Vec<RawMedia>,
}

/// Where a media item's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawMedia {
    /// A file to read: the resolved path and the path as the annotation wrote it.
    File { path: PathBuf, written: String },
    /// Bytes already read (a tar member).
    Bytes(Vec<u8>),
    /// A video file, sampled into frames by the source's frame policy.
    Video {
        path: PathBuf,
        written: String,
        hints: crate::video::Hints,
    },
}

/// Why a record cannot become a sample.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reject {
    pub reason: QuarantineReason,
    pub detail: String,
    pub annotation_id: Option<String>,
}

impl Reject {
    pub fn new(reason: QuarantineReason, detail: impl Into<String>) -> Self {
        Reject {
            reason,
            detail: detail.into(),
            annotation_id: None,
        }
    }
}

pub(crate) type Body = std::result::Result<RawSample, Reject>;

/// Receives each record: its origin and body. Returning an error stops the read.
pub(crate) type Emit<'a> = dyn FnMut(String, Body) -> Result<()> + 'a;

/// Reads one source, emitting every record in file order. `bytes_read` counts
/// the source file's bytes consumed, for progress.
pub(crate) fn read_source(
    spec: &SourceSpec,
    bytes_read: &Arc<AtomicU64>,
    emit: &mut Emit,
) -> Result<()> {
    let file = fs_err::File::open(&spec.path)?;
    let reader = BufReader::with_capacity(
        1 << 20,
        Counting {
            inner: file,
            count: bytes_read.clone(),
        },
    );
    let origin_path = spec.path.display().to_string();
    let media_root = spec.media_root();
    match spec.kind {
        SourceKind::Llava => read_json_records(reader, &origin_path, emit, &|v| {
            llava_sample(v, &media_root)
        }),
        SourceKind::Text => read_jsonl(reader, &origin_path, emit, &text_sample),
        SourceKind::Interleaved => read_jsonl(reader, &origin_path, emit, &|v| {
            interleaved_sample(v, &media_root)
        }),
        SourceKind::Wds => read_wds(reader, &origin_path, emit),
    }
}

struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

type Convert<'a> = dyn Fn(Value) -> Body + 'a;

/// A JSON array (streamed element by element) or JSONL, as VILA's loader
/// accepts both: the first non-blank byte decides.
fn read_json_records<R: BufRead>(
    mut reader: R,
    origin: &str,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    let first = loop {
        let buf = reader.fill_buf()?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == Some(b'[') {
        read_json_array(reader, origin, emit, convert)
    } else {
        read_jsonl(reader, origin, emit, convert)
    }
}

fn read_jsonl<R: BufRead>(
    mut reader: R,
    origin: &str,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let here = format!("{origin}:{number}");
        let body = match std::str::from_utf8(&line) {
            Err(e) => Err(Reject::new(
                QuarantineReason::NonUtf8,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )),
            Ok(text) => match serde_json::from_str::<Value>(text) {
                Err(e) => Err(Reject::new(
                    QuarantineReason::MalformedJson,
                    format!("column {}: {e}", e.column()),
                )),
                Ok(value) => convert(value),
            },
        };
        emit(here, body)?;
    }
}

/// Streams the elements of a top-level JSON array without holding the array.
/// A syntax error ends the array: the elements before it are kept and the
/// rest becomes one quarantine row that says where parsing stopped.
fn read_json_array<R: Read>(
    reader: R,
    origin: &str,
    emit: &mut Emit,
    convert: &Convert,
) -> Result<()> {
    struct Elements<'a, 'b> {
        origin: &'a str,
        emit: &'a mut Emit<'b>,
        convert: &'a Convert<'a>,
        index: &'a mut u64,
        stop: &'a mut Option<Error>,
    }
    impl<'de> Visitor<'de> for Elements<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of annotations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while let Some(value) = seq.next_element::<Value>()? {
                let body = (self.convert)(value);
                if let Err(e) = (self.emit)(format!("{}[{}]", self.origin, self.index), body) {
                    *self.stop = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
                *self.index += 1;
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Elements<'_, '_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut index = 0u64;
    let mut stop = None;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let seed = Elements {
        origin,
        emit,
        convert,
        index: &mut index,
        stop: &mut stop,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    if let Some(e) = stop {
        return Err(e);
    }
    if let Err(e) = parsed {
        let reason = if e.to_string().contains("UTF-8") {
            QuarantineReason::NonUtf8
        } else {
            QuarantineReason::MalformedJson
        };
        let detail = format!(
            "line {} column {}: {e}; the elements after index {index} are not read",
            e.line(),
            e.column()
        );
        emit(
            format!("{origin}[{index}]"),
            Err(Reject::new(reason, detail)),
        )?;
    }
    Ok(())
}

fn annotation_id(value: &Value) -> Option<String> {
    match value.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn with_id(mut reject: Reject, id: &Option<String>) -> Reject {
    reject.annotation_id = id.clone();
    reject
}

/// A LLaVA/VILA annotation to a sample.
fn llava_sample(value: Value, media_root: &Path) -> Body {
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
    })
}

/// Turns must be (system)? user assistant (user assistant)*.
fn check_alternation(segments: &[Segment]) -> std::result::Result<(), Reject> {
    let body = match segments.first() {
        Some(s) if s.role == "system" => &segments[1..],
        _ => segments,
    };
    if body.is_empty() {
        return Err(Reject::new(
            QuarantineReason::EmptyConversation,
            "the conversation has no turns",
        ));
    }
    let offset = segments.len() - body.len();
    for (i, seg) in body.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if seg.role != expected {
            return Err(Reject::new(
                QuarantineReason::NonAlternatingConversation,
                format!(
                    "turn {} is `{}` where `{expected}` was expected",
                    i + offset,
                    seg.role
                ),
            ));
        }
    }
    if body.len() % 2 == 1 {
        return Err(Reject::new(
            QuarantineReason::NonAlternatingConversation,
            "the last turn is from the human: nothing to learn from it",
        ));
    }
    Ok(())
}

fn check_reserved(segments: &[Segment]) -> std::result::Result<(), Reject> {
    for (i, seg) in segments.iter().enumerate() {
        if let Some(tok) = SpecialTokens::RESERVED
            .iter()
            .find(|t| seg.content.contains(*t))
        {
            return Err(Reject::new(
                QuarantineReason::ReservedToken,
                format!("turn {i} contains the template token `{tok}` literally"),
            ));
        }
    }
    Ok(())
}

/// `{"text": ...}` to a document.
fn text_sample(value: Value) -> Body {
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
fn interleaved_sample(value: Value, media_root: &Path) -> Body {
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
    })
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A WebDataset tar: adjacent members sharing a key form one sample.
fn read_wds<R: Read>(reader: R, origin: &str, emit: &mut Emit) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => {
            let reject = Reject::new(
                QuarantineReason::CorruptMedia,
                format!("not a tar archive: {e}"),
            );
            return emit(origin.to_string(), Err(reject));
        }
    };
    let mut group: Option<(String, Vec<(String, Vec<u8>)>)> = None;
    let mut last_member = String::from("(start)");
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                flush_wds(origin, group.take(), emit)?;
                let detail = format!(
                    "tar read error after member `{last_member}`: {e}; the rest is skipped"
                );
                return emit(
                    format!("{origin}!{last_member}"),
                    Err(Reject::new(QuarantineReason::CorruptMedia, detail)),
                );
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        last_member = raw_path.clone();
        let path = Path::new(&raw_path);
        if path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            flush_wds(origin, group.take(), emit)?;
            let detail = "member path is absolute or contains `..`";
            emit(
                format!("{origin}!{raw_path}"),
                Err(Reject::new(QuarantineReason::UnsafePath, detail)),
            )?;
            continue;
        }
        // WebDataset keys are the path up to the first dot of the file name.
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let (stem, ext) = file_name.split_once('.').unwrap_or((file_name, ""));
        let key = path.with_file_name(stem).to_string_lossy().into_owned();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        if let Err(e) = entry.read_to_end(&mut bytes) {
            flush_wds(origin, group.take(), emit)?;
            let detail = format!("cannot read member: {e}; the rest is skipped");
            return emit(
                format!("{origin}!{raw_path}"),
                Err(Reject::new(QuarantineReason::CorruptMedia, detail)),
            );
        }
        if group.as_ref().is_some_and(|(k, _)| *k != key) {
            flush_wds(origin, group.take(), emit)?;
        }
        group
            .get_or_insert_with(|| (key, Vec::new()))
            .1
            .push((ext.to_ascii_lowercase(), bytes));
    }
    flush_wds(origin, group, emit)
}

fn flush_wds(
    origin: &str,
    group: Option<(String, Vec<(String, Vec<u8>)>)>,
    emit: &mut Emit,
) -> Result<()> {
    let Some((key, members)) = group else {
        return Ok(());
    };
    let here = format!("{origin}!{key}");
    let image = members
        .iter()
        .find(|(ext, _)| IMAGE_EXTENSIONS.contains(&ext.as_str()));
    let caption = members.iter().find(|(ext, _)| ext == "txt");
    let body = match (image, caption) {
        (None, _) => Err(Reject::new(
            QuarantineReason::MissingMedia,
            format!("sample `{key}` has no image member"),
        )),
        (_, None) => Err(Reject::new(
            QuarantineReason::EmptyDocument,
            format!("sample `{key}` has no .txt caption"),
        )),
        (Some((_, image)), Some((_, caption))) => match std::str::from_utf8(caption) {
            Err(e) => Err(Reject::new(
                QuarantineReason::NonUtf8,
                format!("{key}.txt: invalid UTF-8 at byte {}", e.valid_up_to()),
            )),
            Ok(text) if text.trim().is_empty() => Err(Reject::new(
                QuarantineReason::EmptyDocument,
                format!("{key}.txt is empty"),
            )),
            Ok(text) => {
                let turns = vec![
                    Segment {
                        role: "user",
                        content: format!("{}\n", SpecialTokens::IMAGE),
                    },
                    Segment {
                        role: "assistant",
                        content: text.trim().to_string(),
                    },
                ];
                check_reserved(&turns).map(|()| RawSample {
                    annotation_id: Some(key.clone()),
                    kind: SampleKind::ImageText,
                    turns,
                    media: vec![RawMedia::Bytes(image.clone())],
                })
            }
        },
    };
    emit(here, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(kind: SourceKind, name: &str, content: &[u8]) -> Vec<(String, Body)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let spec = SourceSpec {
            name: "s".into(),
            kind,
            path,
            media_root: None,
            frames: None,
        };
        let mut out = Vec::new();
        read_source(&spec, &Arc::new(AtomicU64::new(0)), &mut |o, b| {
            out.push((o.rsplit('/').next().unwrap().to_string(), b));
            Ok(())
        })
        .unwrap();
        out
    }

    fn reason(body: &Body) -> Option<QuarantineReason> {
        body.as_ref().err().map(|r| r.reason)
    }

    #[test]
    fn llava_array_and_jsonl_give_the_same_samples() {
        let one = r#"{"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}]}"#;
        let array = collect(
            SourceKind::Llava,
            "a.json",
            format!("[{one}, {one}]").as_bytes(),
        );
        let lines = collect(
            SourceKind::Llava,
            "a.jsonl",
            format!("{one}\n\n{one}\n").as_bytes(),
        );
        assert_eq!(array.len(), 2);
        assert_eq!(array[1].0, "a.json[1]");
        assert_eq!(lines[1].0, "a.jsonl:3");
        let (a, b) = (array[0].1.as_ref().unwrap(), lines[0].1.as_ref().unwrap());
        assert_eq!(
            (&a.turns, a.kind, &a.annotation_id),
            (&b.turns, b.kind, &b.annotation_id)
        );
        assert!(matches!(&a.media[..], [RawMedia::File { written, .. }] if written == "a.png"));
        // The placeholder is added where VILA adds it.
        assert_eq!(a.turns[0].content, "<image>\nWhat?");
        assert_eq!(a.annotation_id.as_deref(), Some("7"));
    }

    #[test]
    fn a_broken_array_keeps_the_elements_before_the_error() {
        let one = r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#;
        let out = collect(
            SourceKind::Llava,
            "a.json",
            format!("[{one}, {one}, {{\"conv").as_bytes(),
        );
        assert_eq!(out.len(), 3);
        assert!(out[0].1.is_ok() && out[1].1.is_ok());
        assert_eq!(reason(&out[2].1), Some(QuarantineReason::MalformedJson));
        assert!(
            out[2].1.as_ref().unwrap_err().detail.contains("line 1"),
            "{:?}",
            out[2].1
        );
    }

    #[test]
    fn video_annotations_follow_vila() {
        let line = r#"{"id": "v1", "video_id": "abc", "fps": 30, "frame_count": 90, "conversations": [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "A ball rolls."}]}"#;
        let out = collect(SourceKind::Llava, "a.jsonl", line.as_bytes());
        let sample = out[0].1.as_ref().unwrap();
        assert_eq!(sample.kind, SampleKind::VideoQa);
        // No placeholder in the text: the video goes before the first question.
        assert_eq!(sample.turns[0].content, "<video>\nWhat happens?");
        match &sample.media[..] {
            [RawMedia::Video { written, hints, .. }] => {
                assert_eq!(written, "abc.mp4");
                assert_eq!((hints.fps, hints.frame_count), (Some(30.0), Some(90)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conversation_checks_have_reason_codes() {
        let cases = [
            (
                r#"{"conversations": []}"#,
                QuarantineReason::EmptyConversation,
            ),
            (
                r#"{"conversations": [{"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::NonAlternatingConversation,
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}]}"#,
                QuarantineReason::NonAlternatingConversation,
            ),
            (
                r#"{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::PlaceholderMismatch,
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q<|im_end|>"}, {"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::ReservedToken,
            ),
            (
                r#"{"video": "v.mp4", "conversations": []}"#,
                QuarantineReason::EmptyConversation,
            ),
            (
                r#"{"video": "v.mp4", "conversations": [{"from": "human", "value": "<video><video>"}, {"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::PlaceholderMismatch,
            ),
            (
                r#"{"video": "v.mp4", "image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::MalformedJson,
            ),
            (
                r#"{"video": "v.mp4", "fps": -2, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
                QuarantineReason::MalformedJson,
            ),
            (r#"{"id": 1}"#, QuarantineReason::MalformedJson),
            (r#"{"id": 1,"#, QuarantineReason::MalformedJson),
        ];
        for (line, expected) in cases {
            let out = collect(SourceKind::Llava, "a.jsonl", line.as_bytes());
            assert_eq!(reason(&out[0].1), Some(expected), "{line}");
        }
        let out = collect(SourceKind::Llava, "a.jsonl", b"{\"x\": \"\xff\"}\n");
        assert_eq!(reason(&out[0].1), Some(QuarantineReason::NonUtf8));
    }

    #[test]
    fn interleaved_images_go_before_their_paragraph() {
        let line = r#"{"text_list": ["Intro.", "A red circle."], "image_info": [{"image_name": "x.png", "matched_text_index": 1}]}"#;
        let out = collect(SourceKind::Interleaved, "d.jsonl", line.as_bytes());
        let s = out[0].1.as_ref().unwrap();
        assert_eq!(s.turns[0].content, "Intro.\n<image>\nA red circle.\n");
        assert_eq!(s.media.len(), 1);
        let out = collect(
            SourceKind::Interleaved,
            "d.jsonl",
            br#"{"text_list": ["", " "]}"#,
        );
        assert_eq!(reason(&out[0].1), Some(QuarantineReason::EmptyDocument));
    }
}
