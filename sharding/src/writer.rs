//! Rows to Parquet parts: `samples-NNNNN.parquet` and `quarantine-NNNNN.parquet`.
//!
//! A part covers a contiguous range of input records `[record_start,
//! record_end)`. Its quarantine file (when it has rows) is written first and
//! its samples file last, each to a temporary name, fsynced and renamed, so the
//! presence of `samples-NNNNN.parquet` means the part is complete. Parts are
//! cut when their estimated uncompressed size reaches the target; the estimate
//! depends only on the rows, so the same inputs give the same parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Float32Array, Float64Array, Int64Array, ListArray, RecordBatch,
    StringArray, StructArray, UInt8Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field};
use lvpipe_schemas::{
    MEDIA_ITEM_FIELDS, MESSAGE_FIELDS, QuarantineReason, SCHEMA_VERSION, SampleKind, TableKind,
    meta, quarantine_schema, samples_schema, validate_batch,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::chat::Segment;
use crate::{Error, Result};

/// A sample ready to be written.
#[derive(Debug, Clone)]
pub(crate) struct SampleRow {
    pub seq: u64,
    pub sample_id: String,
    pub source: String,
    pub kind: SampleKind,
    pub origin: String,
    pub annotation_id: Option<String>,
    pub content_hash: String,
    pub messages: Vec<Segment>,
    pub media: Vec<MediaItem>,
    pub num_images: u32,
    pub num_frames: u32,
    /// Video samples: duration, the stream's frame rate and codec.
    pub video: Option<VideoInfo>,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

impl SampleRow {
    /// Uncompressed size estimate that decides where parts are cut.
    fn estimated_bytes(&self) -> u64 {
        let media: usize = self.media.iter().map(|m| m.bytes.len() + 32).sum();
        let text: usize = self.messages.iter().map(|m| m.content.len() + 8).sum();
        (media + text + self.input_ids.len() * 5 + self.origin.len() + 160) as u64
    }
}

/// What a video sample records about its source video.
#[derive(Debug, Clone)]
pub(crate) struct VideoInfo {
    pub duration_ms: i64,
    pub fps: f64,
    pub codec: String,
}

/// One image or frame as stored.
#[derive(Debug, Clone)]
pub(crate) struct MediaItem {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub orig_width: u32,
    pub orig_height: u32,
    pub frame_index: Option<u32>,
    pub timestamp_ms: Option<i64>,
}

impl MediaItem {
    /// A stored image, or a video frame with its (index, timestamp ms).
    pub fn new(image: crate::media::ProcessedImage, frame: Option<(u32, i64)>) -> Self {
        MediaItem {
            bytes: image.bytes,
            width: image.width,
            height: image.height,
            orig_width: image.orig_width,
            orig_height: image.orig_height,
            frame_index: frame.map(|f| f.0),
            timestamp_ms: frame.map(|f| f.1),
        }
    }
}

/// An input that did not become a sample.
#[derive(Debug, Clone)]
pub(crate) struct QuarantineRow {
    pub seq: u64,
    pub source: String,
    pub origin: String,
    pub reason: QuarantineReason,
    pub detail: String,
    pub annotation_id: Option<String>,
}

/// Identity written into every part's metadata.
#[derive(Debug, Clone)]
pub(crate) struct PartIdentity {
    pub tokenizer_fingerprint: String,
    pub chat_template: String,
    pub build_fingerprint: String,
}

pub(crate) fn part_file(dir: &Path, table: TableKind, index: u32) -> PathBuf {
    dir.join(format!("{}-{index:05}.parquet", table.file_prefix()))
}

/// Writes parts in order, cutting them at the target size.
pub(crate) struct PartWriter {
    dir: PathBuf,
    identity: PartIdentity,
    target_bytes: u64,
    row_group_rows: usize,
    next_index: u32,
    next_record: u64,
    open: Option<OpenPart>,
}

struct OpenPart {
    record_start: u64,
    tmp: PathBuf,
    writer: ArrowWriter<std::fs::File>,
    pending: Vec<SampleRow>,
    quarantine: Vec<QuarantineRow>,
    estimated: u64,
}

impl PartWriter {
    /// `next_index` and `next_record` continue after the parts already on disk.
    pub fn new(
        dir: &Path,
        identity: PartIdentity,
        target_bytes: u64,
        row_group_rows: usize,
        next_index: u32,
        next_record: u64,
    ) -> Self {
        PartWriter {
            dir: dir.to_path_buf(),
            identity,
            target_bytes: target_bytes.max(1),
            row_group_rows: row_group_rows.max(1),
            next_index,
            next_record,
            open: None,
        }
    }

    /// Number of parts written so far, including those found on disk.
    pub fn parts(&self) -> u32 {
        self.next_index
    }

    pub fn push_sample(&mut self, row: SampleRow) -> Result<Option<PathBuf>> {
        let seq = row.seq;
        let row_group_rows = self.row_group_rows;
        let part = self.open_part()?;
        part.estimated += row.estimated_bytes();
        part.pending.push(row);
        if part.pending.len() >= row_group_rows {
            let batch = samples_batch(&part.pending)?;
            part.writer.write(&batch)?;
            part.pending.clear();
        }
        self.cut_if_full(seq)
    }

    pub fn push_quarantine(&mut self, row: QuarantineRow) -> Result<Option<PathBuf>> {
        let seq = row.seq;
        let part = self.open_part()?;
        part.estimated += (row.origin.len() + row.detail.len() + 64) as u64;
        part.quarantine.push(row);
        self.cut_if_full(seq)
    }

    /// Closes the last part at `record_end`. A build that produced no rows at
    /// all still gets one (empty) samples file, so the table exists.
    pub fn finish(mut self, record_end: u64) -> Result<Option<PathBuf>> {
        if self.open.is_some() || self.next_index == 0 {
            self.open_part()?;
            return self.close(record_end).map(Some);
        }
        Ok(None)
    }

    fn cut_if_full(&mut self, seq: u64) -> Result<Option<PathBuf>> {
        match &self.open {
            Some(part) if part.estimated >= self.target_bytes => self.close(seq + 1).map(Some),
            _ => Ok(None),
        }
    }

    fn properties(&self, table: TableKind, record_start: u64) -> WriterProperties {
        let kv = |k: &str, v: &str| KeyValue::new(k.to_string(), v.to_string());
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).expect("valid level"),
            ))
            .set_max_row_group_row_count(Some(self.row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Page)
            // Dictionaries help the low-cardinality columns and waste time on
            // image bytes and token lists.
            .set_dictionary_enabled(false)
            .set_column_dictionary_enabled("source".into(), true)
            .set_column_dictionary_enabled("kind".into(), true)
            .set_column_dictionary_enabled("reason".into(), true)
            .set_key_value_metadata(Some(vec![
                kv(meta::SCHEMA_VERSION, SCHEMA_VERSION),
                kv(meta::TABLE, table.as_str()),
                kv(
                    meta::TOKENIZER_FINGERPRINT,
                    &self.identity.tokenizer_fingerprint,
                ),
                kv(meta::CHAT_TEMPLATE, &self.identity.chat_template),
                kv(meta::BUILD_FINGERPRINT, &self.identity.build_fingerprint),
                kv(meta::RECORD_START, &record_start.to_string()),
            ]))
            .build()
    }

    fn open_part(&mut self) -> Result<&mut OpenPart> {
        if self.open.is_none() {
            let path = part_file(&self.dir, TableKind::Samples, self.next_index);
            let tmp = tmp_path(&path);
            let file = std::fs::File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
            let props = self.properties(TableKind::Samples, self.next_record);
            let writer = ArrowWriter::try_new(file, samples_schema(), Some(props))?;
            self.open = Some(OpenPart {
                record_start: self.next_record,
                tmp,
                writer,
                pending: Vec::new(),
                quarantine: Vec::new(),
                estimated: 0,
            });
        }
        Ok(self.open.as_mut().expect("opened above"))
    }

    fn close(&mut self, record_end: u64) -> Result<PathBuf> {
        let mut part = self
            .open
            .take()
            .ok_or_else(|| Error::Internal("no open part".into()))?;
        let index = self.next_index;
        let end = KeyValue::new(meta::RECORD_END.to_string(), record_end.to_string());
        if !part.quarantine.is_empty() {
            let path = part_file(&self.dir, TableKind::Quarantine, index);
            let tmp = tmp_path(&path);
            let file = std::fs::File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
            let props = self.properties(TableKind::Quarantine, part.record_start);
            let mut writer = ArrowWriter::try_new(file, quarantine_schema(), Some(props))?;
            writer.write(&quarantine_batch(&part.quarantine)?)?;
            writer.append_key_value_metadata(end.clone());
            commit(writer.into_inner()?, &tmp, &path)?;
        }
        if !part.pending.is_empty() {
            part.writer.write(&samples_batch(&part.pending)?)?;
        }
        part.writer.append_key_value_metadata(end);
        let path = part_file(&self.dir, TableKind::Samples, index);
        commit(part.writer.into_inner()?, &part.tmp, &path)?;
        self.next_index += 1;
        self.next_record = record_end;
        Ok(path)
    }
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn io_at(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// fsync the file, rename it into place, fsync the folder: after a crash the
/// final name holds either nothing or the whole file.
fn commit(file: std::fs::File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all().map_err(|e| io_at(tmp, e))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| io_at(path, e))?;
    sync_dir(path)
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_at(dir, e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| io_at(&tmp, e))?;
    let file = std::fs::File::open(&tmp).map_err(|e| io_at(&tmp, e))?;
    commit(file, &tmp, path)
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    // `from_iter_values` needs an exact size hint, which flattened turns lack.
    Arc::new(values.map(Some).collect::<StringArray>())
}

fn opt_strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn list(
    item: DataType,
    lengths: impl Iterator<Item = usize>,
    values: ArrayRef,
) -> Result<ArrayRef> {
    let field = Arc::new(Field::new("item", item, false));
    Ok(Arc::new(ListArray::try_new(
        field,
        OffsetBuffer::from_lengths(lengths),
        values,
        None,
    )?))
}

/// Builds a `samples` batch, computing the derived and audit columns.
pub(crate) fn samples_batch(rows: &[SampleRow]) -> Result<RecordBatch> {
    let u32s = |f: &dyn Fn(&SampleRow) -> u32| {
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(f))) as ArrayRef
    };
    let u64s = |f: &dyn Fn(&SampleRow) -> u64| {
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(f))) as ArrayRef
    };

    let all_messages = rows.iter().flat_map(|r| &r.messages);
    let messages = StructArray::try_new(
        MESSAGE_FIELDS.clone(),
        vec![
            strings(all_messages.clone().map(|m| m.role)),
            strings(all_messages.map(|m| m.content.as_str())),
        ],
        None,
    )?;
    let items: Vec<&MediaItem> = rows.iter().flat_map(|r| &r.media).collect();
    let media = StructArray::try_new(
        MEDIA_ITEM_FIELDS.clone(),
        vec![
            Arc::new(BinaryArray::from_iter_values(
                items.iter().map(|m| &m.bytes),
            )),
            strings(items.iter().map(|_| "jpeg")),
            Arc::new(UInt32Array::from_iter_values(items.iter().map(|m| m.width))),
            Arc::new(UInt32Array::from_iter_values(
                items.iter().map(|m| m.height),
            )),
            Arc::new(UInt32Array::from_iter_values(
                items.iter().map(|m| m.orig_width),
            )),
            Arc::new(UInt32Array::from_iter_values(
                items.iter().map(|m| m.orig_height),
            )),
            Arc::new(items.iter().map(|m| m.frame_index).collect::<UInt32Array>()),
            Arc::new(items.iter().map(|m| m.timestamp_ms).collect::<Int64Array>()),
        ],
        None,
    )?;
    let input_ids =
        UInt32Array::from_iter_values(rows.iter().flat_map(|r| r.input_ids.iter().copied()));
    let loss_mask =
        UInt8Array::from_iter_values(rows.iter().flat_map(|r| r.loss_mask.iter().copied()));
    let first_media = |r: &SampleRow| r.media.first().map(|m| (m.orig_width, m.orig_height));

    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.sample_id.as_str())),
        strings(rows.iter().map(|r| r.source.as_str())),
        strings(rows.iter().map(|r| r.kind.as_str())),
        strings(rows.iter().map(|r| r.origin.as_str())),
        opt_strings(rows.iter().map(|r| r.annotation_id.as_deref())),
        strings(rows.iter().map(|r| r.content_hash.as_str())),
        list(
            DataType::Struct(MESSAGE_FIELDS.clone()),
            rows.iter().map(|r| r.messages.len()),
            Arc::new(messages),
        )?,
        list(
            DataType::Struct(MEDIA_ITEM_FIELDS.clone()),
            rows.iter().map(|r| r.media.len()),
            Arc::new(media),
        )?,
        u32s(&|r| r.num_images),
        u32s(&|r| r.num_frames),
        Arc::new(
            rows.iter()
                .map(|r| r.video.as_ref().map(|v| v.duration_ms))
                .collect::<Int64Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.video.as_ref().map(|v| v.fps))
                .collect::<Float64Array>(),
        ),
        opt_strings(
            rows.iter()
                .map(|r| r.video.as_ref().map(|v| v.codec.as_str())),
        ),
        list(
            DataType::UInt32,
            rows.iter().map(|r| r.input_ids.len()),
            Arc::new(input_ids),
        )?,
        list(
            DataType::UInt8,
            rows.iter().map(|r| r.loss_mask.len()),
            Arc::new(loss_mask),
        )?,
        u32s(&|r| r.input_ids.len() as u32),
        u32s(&|r| r.loss_mask.iter().map(|&m| u32::from(m)).sum()),
        u32s(&|r| r.messages.iter().filter(|m| m.role != "system").count() as u32),
        u64s(&|r| r.messages.iter().map(|m| m.content.len() as u64).sum()),
        u64s(&|r| r.media.iter().map(|m| m.bytes.len() as u64).sum()),
        Arc::new(
            rows.iter()
                .map(|r| {
                    r.media
                        .iter()
                        .map(|m| m.orig_width.min(m.orig_height))
                        .min()
                })
                .collect::<UInt32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| {
                    r.media
                        .iter()
                        .map(|m| m.orig_width.max(m.orig_height))
                        .max()
                })
                .collect::<UInt32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| first_media(r).map(|(w, h)| w as f32 / h as f32))
                .collect::<Float32Array>(),
        ),
    ];
    let batch = RecordBatch::try_new(samples_schema(), columns)?;
    validate_batch(TableKind::Samples, &batch)?;
    Ok(batch)
}

pub(crate) fn quarantine_batch(rows: &[QuarantineRow]) -> Result<RecordBatch> {
    let batch = RecordBatch::try_new(
        quarantine_schema(),
        vec![
            strings(rows.iter().map(|r| r.source.as_str())),
            strings(rows.iter().map(|r| r.origin.as_str())),
            strings(rows.iter().map(|r| r.reason.as_str())),
            strings(rows.iter().map(|r| r.detail.as_str())),
            opt_strings(rows.iter().map(|r| r.annotation_id.as_deref())),
        ],
    )?;
    validate_batch(TableKind::Quarantine, &batch)?;
    Ok(batch)
}
