//! Column definitions of the `samples`, `quarantine` and `manifest` tables.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};

use crate::{Error, Result};

/// What a sample is, as stored in the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleKind {
    /// One or more images with a conversation about them (captions, VQA).
    ImageText,
    /// A document of text paragraphs with images between them (MMC4-style).
    Interleaved,
    /// A video, stored as sampled frames, with a conversation about it.
    VideoQa,
    /// Text only: a long document or a text conversation.
    Text,
}

impl SampleKind {
    pub const ALL: [SampleKind; 4] = [
        SampleKind::ImageText,
        SampleKind::Interleaved,
        SampleKind::VideoQa,
        SampleKind::Text,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SampleKind::ImageText => "image_text",
            SampleKind::Interleaved => "interleaved",
            SampleKind::VideoQa => "video_qa",
            SampleKind::Text => "text",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == value)
            .ok_or_else(|| unknown("sample kind", value, Self::ALL.map(Self::as_str)))
    }
}

/// Why an input did not become a sample: the `reason` column of `quarantine`.
///
/// The codes are stable strings that users group by in SQL; add new ones at the
/// end and never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuarantineReason {
    /// A line or element is not valid JSON, or lacks a required field.
    MalformedJson,
    /// Text that is not valid UTF-8.
    NonUtf8,
    /// A referenced media file does not exist.
    MissingMedia,
    /// Media bytes that cannot be decoded.
    CorruptMedia,
    /// Media larger than the configured limits (decompression bombs).
    MediaTooLarge,
    /// The number of `<image>` placeholders differs from the images given.
    PlaceholderMismatch,
    /// A conversation with no turns.
    EmptyConversation,
    /// Turns that do not alternate human/gpt, or an unknown role.
    NonAlternatingConversation,
    /// A tar member or media path that is absolute or escapes with `..`.
    UnsafePath,
    /// A document with no text.
    EmptyDocument,
    /// The same content already appeared earlier in the same source.
    Duplicate,
    /// A media kind this build does not ingest (e.g. video before FFmpeg support).
    UnsupportedMedia,
    /// A record whose text contains a reserved special token (e.g. `<|im_end|>`),
    /// which would corrupt the chat template.
    ReservedToken,
    /// A media file with no video stream (audio only, an image, a subtitle file).
    NoVideoStream,
    /// A video codec this FFmpeg cannot decode.
    UnsupportedCodec,
    /// A video whose duration is zero or that neither the container nor the
    /// annotation (`fps`, `frame_count`) gives.
    UnknownDuration,
    /// Fewer distinct decodable frames than the frame policy asks for (with
    /// `--short-videos quarantine`), or none at all.
    TooFewFrames,
    /// A JSONL line longer than `--max-record-bytes`, not parsed.
    RecordTooLarge,
    /// Pre-tokenized ids that are missing, not integers, empty, or outside
    /// the tokenizer's vocabulary.
    InvalidTokens,
    /// Rows of a Parquet or Arrow file (a row group or batch) that cannot be
    /// decoded; the file's other rows are read.
    UnreadableRows,
}

impl QuarantineReason {
    pub const ALL: [QuarantineReason; 20] = [
        QuarantineReason::MalformedJson,
        QuarantineReason::NonUtf8,
        QuarantineReason::MissingMedia,
        QuarantineReason::CorruptMedia,
        QuarantineReason::MediaTooLarge,
        QuarantineReason::PlaceholderMismatch,
        QuarantineReason::EmptyConversation,
        QuarantineReason::NonAlternatingConversation,
        QuarantineReason::UnsafePath,
        QuarantineReason::EmptyDocument,
        QuarantineReason::Duplicate,
        QuarantineReason::UnsupportedMedia,
        QuarantineReason::ReservedToken,
        QuarantineReason::NoVideoStream,
        QuarantineReason::UnsupportedCodec,
        QuarantineReason::UnknownDuration,
        QuarantineReason::TooFewFrames,
        QuarantineReason::RecordTooLarge,
        QuarantineReason::InvalidTokens,
        QuarantineReason::UnreadableRows,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::MalformedJson => "malformed_json",
            QuarantineReason::NonUtf8 => "non_utf8",
            QuarantineReason::MissingMedia => "missing_media",
            QuarantineReason::CorruptMedia => "corrupt_media",
            QuarantineReason::MediaTooLarge => "media_too_large",
            QuarantineReason::PlaceholderMismatch => "placeholder_mismatch",
            QuarantineReason::EmptyConversation => "empty_conversation",
            QuarantineReason::NonAlternatingConversation => "non_alternating_conversation",
            QuarantineReason::UnsafePath => "unsafe_path",
            QuarantineReason::EmptyDocument => "empty_document",
            QuarantineReason::Duplicate => "duplicate",
            QuarantineReason::UnsupportedMedia => "unsupported_media",
            QuarantineReason::ReservedToken => "reserved_token",
            QuarantineReason::NoVideoStream => "no_video_stream",
            QuarantineReason::UnsupportedCodec => "unsupported_codec",
            QuarantineReason::UnknownDuration => "unknown_duration",
            QuarantineReason::TooFewFrames => "too_few_frames",
            QuarantineReason::RecordTooLarge => "record_too_large",
            QuarantineReason::InvalidTokens => "invalid_tokens",
            QuarantineReason::UnreadableRows => "unreadable_rows",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == value)
            .ok_or_else(|| unknown("quarantine reason", value, Self::ALL.map(Self::as_str)))
    }
}

impl std::fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for SampleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn unknown<const N: usize>(what: &'static str, value: &str, all: [&str; N]) -> Error {
    Error::UnknownValue {
        what,
        value: value.to_string(),
        expected: all.join(", "),
    }
}

/// Fields of one element of `messages`: the original turn text, kept for audit
/// and re-tokenization. Roles are the template's (`system`, `user`,
/// `assistant`) for conversations and `text` for documents.
pub static MESSAGE_FIELDS: LazyLock<Fields> = LazyLock::new(|| {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ])
});

/// Fields of one element of `media`: an image or a video frame, re-encoded at
/// the build's image size. Frames carry their index and presentation time;
/// images leave those null.
pub static MEDIA_ITEM_FIELDS: LazyLock<Fields> = LazyLock::new(|| {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("orig_width", DataType::UInt32, false),
        Field::new("orig_height", DataType::UInt32, false),
        Field::new("frame_index", DataType::UInt32, true),
        Field::new("timestamp_ms", DataType::Int64, true),
    ])
});

fn list_of(name: &str, item: DataType, nullable_items: bool) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, nullable_items))),
        false,
    )
}

static SAMPLES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("origin", DataType::Utf8, false),
        Field::new("annotation_id", DataType::Utf8, true),
        Field::new("content_hash", DataType::Utf8, false),
        list_of("messages", DataType::Struct(MESSAGE_FIELDS.clone()), false),
        list_of("media", DataType::Struct(MEDIA_ITEM_FIELDS.clone()), false),
        Field::new("num_images", DataType::UInt32, false),
        Field::new("num_frames", DataType::UInt32, false),
        Field::new("duration_ms", DataType::Int64, true),
        Field::new("video_fps", DataType::Float64, true),
        Field::new("video_codec", DataType::Utf8, true),
        list_of("input_ids", DataType::UInt32, false),
        list_of("loss_mask", DataType::UInt8, false),
        Field::new("num_text_tokens", DataType::UInt32, false),
        Field::new("num_loss_tokens", DataType::UInt32, false),
        Field::new("num_turns", DataType::UInt32, false),
        Field::new("text_bytes", DataType::UInt64, false),
        Field::new("media_bytes", DataType::UInt64, false),
        Field::new("min_orig_side", DataType::UInt32, true),
        Field::new("max_orig_side", DataType::UInt32, true),
        Field::new("aspect_ratio", DataType::Float32, true),
    ]))
});

static QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("origin", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("annotation_id", DataType::Utf8, true),
    ]))
});

static MANIFEST: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("file", DataType::Utf8, false),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("blake3", DataType::Utf8, false),
        Field::new("record_start", DataType::UInt64, false),
        Field::new("record_end", DataType::UInt64, false),
        Field::new("schema_version", DataType::Utf8, false),
        Field::new("tokenizer_fingerprint", DataType::Utf8, false),
    ]))
});

/// The `samples` table: one row per sample.
///
/// Media placeholders (`<image>`, `<video>`) stay one token each in
/// `input_ids`; the expanded length depends on the model and is computed where
/// the model is known. `loss_mask` is 1 on assistant content and its closing
/// end-of-turn token (or every token of a text document), 0 elsewhere.
pub fn samples_schema() -> SchemaRef {
    SAMPLES.clone()
}

/// The `quarantine` table: one row per input that could not become a sample.
pub fn quarantine_schema() -> SchemaRef {
    QUARANTINE.clone()
}

/// The `manifest` table: one row per shard file, as `manifest.json` lists them.
pub fn manifest_schema() -> SchemaRef {
    MANIFEST.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_codes_round_trip() {
        for kind in SampleKind::ALL {
            assert_eq!(SampleKind::parse(kind.as_str()).unwrap(), kind);
        }
        for reason in QuarantineReason::ALL {
            assert_eq!(QuarantineReason::parse(reason.as_str()).unwrap(), reason);
        }
        let err = QuarantineReason::parse("nope").unwrap_err().to_string();
        assert!(err.contains("malformed_json"), "{err}");
    }

    #[test]
    fn video_columns_are_present() {
        let schema = samples_schema();
        for name in ["num_frames", "duration_ms", "video_fps", "video_codec"] {
            assert!(schema.field_with_name(name).is_ok(), "{name}");
        }
        assert!(MEDIA_ITEM_FIELDS.find("timestamp_ms").is_some());
    }
}
