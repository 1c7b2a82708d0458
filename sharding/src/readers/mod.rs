//! Source readers: raw files to numbered records, or to rejections.
//!
//! Readers only parse annotations and check their structure; media files are
//! opened later, in parallel, by the processing stage. Every record a reader
//! meets is emitted exactly once, as a [`RawSample`] or a [`Reject`], with an
//! origin that names the file and the line, element or tar member.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lvpipe_schemas::{QuarantineReason, SampleKind};
use serde_json::Value;

use crate::Result;
use crate::chat::{Segment, SpecialTokens};
use crate::source::{SourceKind, SourceSpec};

mod columnar;
#[cfg(test)]
mod fuzz;
mod json;
mod llava;
mod text;
mod wds;

use columnar::{is_columnar, json_tokens, read_columnar, row_json, row_tokens};
use json::{read_json_records, read_jsonl};
use llava::llava_sample;
use text::{interleaved_sample, text_sample};
use wds::read_wds;

/// A record that passed the structural checks; media not yet read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawSample {
    pub annotation_id: Option<String>,
    pub kind: SampleKind,
    /// Template roles; documents are one `text` segment.
    pub turns: Vec<Segment>,
    pub media: Vec<RawMedia>,
    /// Pre-tokenized ids (a `tokens` source): used as they are, every one in
    /// the loss; `turns` is then empty.
    pub tokens: Option<Vec<u32>>,
}

/// Where a media item's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawMedia {
    /// A file to read: the resolved path and the path as the annotation wrote it.
    File { path: PathBuf, written: String },
    /// Bytes already read.
    Bytes(Vec<u8>),
    /// A tar member's data, read by whoever builds the record: the reader
    /// seeks past it, so a partition task never reads the members of
    /// records it does not own.
    Member {
        archive: Arc<PathBuf>,
        name: String,
        offset: u64,
        size: u64,
    },
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

/// What a reader holds in memory at most, per record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadLimits {
    /// A JSONL line.
    pub record_bytes: u64,
    /// A tar member.
    pub member_bytes: u64,
}

/// How far the build is through its input files.
#[derive(Debug, Default)]
pub(crate) struct InputBytes {
    /// Bytes read or skipped by the readers: progress.
    pub passed: AtomicU64,
    /// Bytes read from annotation files and archives, tar members read by
    /// the workers included (media files aside).
    pub read: AtomicU64,
}

impl InputBytes {
    pub fn add_read(&self, n: u64) {
        self.passed.fetch_add(n, Ordering::Relaxed);
        self.read.fetch_add(n, Ordering::Relaxed);
    }
}

/// The read buffer of annotation files.
const ANNOTATION_BUFFER: usize = 1 << 20;

/// Reads one source, emitting every record in file order, and counts its
/// bytes into `bytes`.
pub(crate) fn read_source(
    spec: &SourceSpec,
    bytes: &Arc<InputBytes>,
    limits: ReadLimits,
    emit: &mut Emit,
) -> Result<()> {
    let file = fs_err::File::open(&spec.path)?;
    let file_bytes = file.metadata()?.len();
    let counting = Counting {
        inner: file,
        count: bytes.clone(),
    };
    let buffered = move |capacity| BufReader::with_capacity(capacity, counting);
    let origin_path = spec.path.display().to_string();
    let media_root = spec.media_root();
    match spec.kind {
        SourceKind::Llava => read_json_records(
            buffered(ANNOTATION_BUFFER),
            &origin_path,
            limits,
            emit,
            &|v| llava_sample(v, &media_root),
        ),
        SourceKind::Text => read_jsonl(
            buffered(ANNOTATION_BUFFER),
            &origin_path,
            limits,
            emit,
            &text_sample,
        ),
        SourceKind::Interleaved => read_jsonl(
            buffered(ANNOTATION_BUFFER),
            &origin_path,
            limits,
            emit,
            &|v| interleaved_sample(v, &media_root),
        ),
        SourceKind::Wds => {
            // Headers and captions fit; an image past it is skipped unread.
            let reader = SkipReader(buffered(16 << 10));
            let limit = limits.member_bytes.min(file_bytes);
            let archive = Arc::new(spec.path.clone());
            read_wds(reader, &archive, &origin_path, limit, emit)
        }
        SourceKind::Tokens if is_columnar(&spec.path) => {
            read_columnar(&spec.path, &origin_path, bytes, emit, &row_tokens)
        }
        SourceKind::Tokens => read_jsonl(
            buffered(ANNOTATION_BUFFER),
            &origin_path,
            limits,
            emit,
            &json_tokens,
        ),
        SourceKind::LlavaParquet => {
            read_columnar(&spec.path, &origin_path, bytes, emit, &|batch, row| {
                llava_sample(row_json(batch, row), &media_root)
            })
        }
    }
}

/// A file whose reads and skips are counted.
struct Counting<R> {
    inner: R,
    count: Arc<InputBytes>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.add_read(n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        if let SeekFrom::Current(skipped @ 1..) = pos {
            self.count
                .passed
                .fetch_add(skipped as u64, Ordering::Relaxed);
        }
        self.inner.seek(pos)
    }
}

/// A buffered reader whose relative seeks keep the buffer when they land in
/// it (`BufReader::seek` always drops it) and skip the bytes when they do
/// not.
struct SkipReader<R>(BufReader<R>);

impl<R: Read> Read for SkipReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Seek> Seek for SkipReader<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match pos {
            SeekFrom::Current(n) => {
                self.0.seek_relative(n)?;
                self.0.stream_position()
            }
            other => self.0.seek(other),
        }
    }
}

pub(super) fn annotation_id(value: &Value) -> Option<String> {
    match value.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn with_id(mut reject: Reject, id: &Option<String>) -> Reject {
    reject.annotation_id = id.clone();
    reject
}

/// Turns must be (system)? user assistant (user assistant)*.
pub(super) fn check_alternation(segments: &[Segment]) -> std::result::Result<(), Reject> {
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

pub(super) fn check_reserved(segments: &[Segment]) -> std::result::Result<(), Reject> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a reader over `content` written to a temporary file `name`
    /// (beside an `a.png` that is no image), within `limit` bytes per record
    /// and member: what it emitted (origins as file names with their line or
    /// member), or the error that stopped it.
    pub(super) fn read_file(
        kind: SourceKind,
        name: &str,
        content: &[u8],
        limit: u64,
    ) -> std::result::Result<Vec<(String, Body)>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::write(dir.path().join("a.png"), b"not an image").unwrap();
        let spec = SourceSpec {
            name: "s".into(),
            kind,
            path,
            media_root: None,
            frames: None,
        };
        let limits = ReadLimits {
            record_bytes: limit,
            member_bytes: limit,
        };
        let mut out = Vec::new();
        read_source(&spec, &Arc::default(), limits, &mut |o, b| {
            out.push((o.rsplit('/').next().unwrap().to_string(), b));
            Ok(())
        })
        .map(|()| out)
        .map_err(|e| e.to_string())
    }

    fn collect(kind: SourceKind, name: &str, content: &[u8]) -> Vec<(String, Body)> {
        read_file(kind, name, content, 1 << 20).unwrap()
    }

    fn reason(body: &Body) -> Option<QuarantineReason> {
        body.as_ref().err().map(|r| r.reason)
    }

    #[test]
    fn a_line_over_the_record_limit_is_quarantined_and_the_next_one_read() {
        // 2 MiB of text in one line, over the tests' 1 MiB limit.
        let long = format!("{{\"id\": \"big\", \"text\": \"{}\"}}", "a".repeat(2 << 20));
        let content = format!("{long}\n{{\"id\": \"small\", \"text\": \"A short one.\"}}\n");
        let out = collect(SourceKind::Text, "docs.jsonl", content.as_bytes());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "docs.jsonl:1");
        assert_eq!(reason(&out[0].1), Some(QuarantineReason::RecordTooLarge));
        assert!(
            out[0]
                .1
                .as_ref()
                .err()
                .unwrap()
                .detail
                .contains(&format!("{} bytes", long.len() + 1)),
            "{:?}",
            out[0].1.as_ref().err()
        );
        assert_eq!(out[1].0, "docs.jsonl:2");
        assert!(out[1].1.is_ok());
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
