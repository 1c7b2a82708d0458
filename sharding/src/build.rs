//! `build-shards`: the bounded read -> process -> write pipeline, resume and manifest.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use lvpipe_schemas::{
    Manifest, ManifestShard, ManifestSource, QuarantineReason, SCHEMA_VERSION, TableKind, meta,
};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use serde::Serialize;

use crate::chat::{CHAT_TEMPLATE, ChatTokenizer, Segment, SpecialTokens};
use crate::media::{ImageSettings, encode_rgb, process_image};
use crate::readers::{Body, RawMedia, RawSample, Reject, read_source};
use crate::source::SourceSpec;
use crate::video::VideoSettings;
use crate::writer::{
    MediaItem, PartIdentity, PartWriter, QuarantineRow, SampleRow, VideoInfo, part_file,
    write_atomic,
};
use crate::{Error, Result};

/// How images keep their aspect ratio when made square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageAspect {
    /// Resize the longer side to the target and pad to a square (VILA `pad`).
    Pad,
    /// Squash to the square, ignoring the aspect ratio (VILA `resize`).
    Resize,
}

/// Everything a build needs, resolved and validated by the caller's CLI.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub out: PathBuf,
    pub tokenizer: PathBuf,
    pub sources: Vec<SourceSpec>,
    pub image: ImageSettings,
    /// How videos are sampled; a source's `frames` overrides the policy.
    pub video: VideoSettings,
    /// Approximate uncompressed bytes per shard before it is cut.
    pub target_shard_bytes: u64,
    /// Rows per Parquet row group (the unit of random access).
    pub row_group_rows: usize,
    /// Records handed to the parallel stage at once.
    pub chunk_records: usize,
    /// Stop at the first record that would be quarantined.
    pub strict: bool,
    /// Replace a different build found in `out` instead of refusing.
    pub overwrite: bool,
    /// Worker threads for decoding and tokenization (default: all cores).
    pub threads: Option<usize>,
    /// Quarantine exact duplicates (same content) within a source.
    pub dedup: bool,
    /// Stop with an error after writing this many shards (to test resume).
    pub fail_after_shards: Option<u32>,
}

impl BuildSettings {
    /// The video settings of source `index`: the build's, with the source's
    /// own frame policy where the registry gives one.
    pub fn video_for(&self, index: usize) -> Result<VideoSettings> {
        let mut video = self.video;
        if let Some(frames) = &self.sources[index].frames {
            video.policy = frames.parse().map_err(|e| {
                Error::Config(format!("source `{}`: {e}", self.sources[index].name))
            })?;
        }
        Ok(video)
    }

    pub fn new(out: impl Into<PathBuf>, tokenizer: impl Into<PathBuf>) -> Self {
        BuildSettings {
            out: out.into(),
            tokenizer: tokenizer.into(),
            sources: Vec::new(),
            image: ImageSettings::default(),
            video: VideoSettings::default(),
            target_shard_bytes: 256 << 20,
            row_group_rows: 256,
            chunk_records: 64,
            strict: false,
            overwrite: false,
            threads: None,
            dedup: true,
            fail_after_shards: None,
        }
    }

    pub fn with_sources(mut self, sources: Vec<SourceSpec>) -> Self {
        self.sources = sources;
        self
    }

    fn check(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(Error::Config(
                "no sources: give --source KIND:PATH or --registry FILE".into(),
            ));
        }
        for i in 0..self.sources.len() {
            self.video_for(i)?;
        }
        let mut names = HashSet::new();
        for s in &self.sources {
            if !names.insert(&s.name) {
                return Err(Error::Config(format!(
                    "two sources are named `{}`: name them with NAME=KIND:PATH or in the registry",
                    s.name
                )));
            }
            if !s.path.is_file() {
                return Err(Error::Config(format!(
                    "source `{}`: {} is not a file",
                    s.name,
                    s.path.display()
                )));
            }
            if let Some(root) = &s.media_root
                && !root.is_dir()
            {
                return Err(Error::Config(format!(
                    "source `{}`: media root {} is not a folder",
                    s.name,
                    root.display()
                )));
            }
        }
        if !(1..=100).contains(&self.image.jpeg_quality) || self.image.size == 0 {
            return Err(Error::Config(
                "image size must be > 0 and JPEG quality 1 to 100".into(),
            ));
        }
        Ok(())
    }
}

/// What a build reports while it runs.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    /// The build starts (or resumes after `resumed_records` records).
    Started {
        input_bytes: u64,
        resumed_records: u64,
        resumed_shards: u32,
    },
    /// Records processed so far in this run.
    Progress {
        input_bytes_read: u64,
        samples: u64,
        quarantined: u64,
    },
    /// A record was quarantined.
    Quarantined {
        origin: String,
        reason: QuarantineReason,
        detail: String,
    },
    /// A shard file was committed.
    ShardWritten { path: PathBuf },
}

/// The outcome of a build, from its manifest.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub samples: u64,
    pub quarantined: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Number of samples shards.
    pub shards: usize,
    /// Bytes of all shard files.
    pub bytes: u64,
    pub seconds: f64,
    /// Records skipped because an earlier run had written them.
    pub resumed_records: u64,
    /// The folder already held this exact build; nothing was done.
    pub up_to_date: bool,
    pub manifest: Manifest,
}

/// A record on its way through the pipeline.
struct RawRecord {
    seq: u64,
    source: usize,
    origin: String,
    body: Body,
}

enum Processed {
    Sample(Box<SampleRow>, u128),
    Rejected(QuarantineRow),
}

/// Builds (or resumes, or confirms) the shards of `settings.out`.
pub fn build_shards(
    settings: &BuildSettings,
    observer: &(dyn Fn(BuildEvent) + Sync),
) -> Result<BuildSummary> {
    let started = Instant::now();
    settings.check()?;
    let tokenizer = ChatTokenizer::load(&settings.tokenizer)?;
    let (fingerprint, build_args) = build_fingerprint(settings, tokenizer.fingerprint())?;
    fs_err::create_dir_all(&settings.out)?;
    let resume = match prepare_out_dir(settings, &fingerprint)? {
        OutState::Complete(manifest) => {
            return summarize(manifest, &settings.out, started, 0, true);
        }
        OutState::Resume(resume) => resume,
    };
    let input_bytes = settings
        .sources
        .iter()
        .map(|s| s.path.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    observer(BuildEvent::Started {
        input_bytes,
        resumed_records: resume.next_record,
        resumed_shards: resume.next_index,
    });
    let seen = if settings.dedup {
        existing_sample_ids(&settings.out, resume.next_index)?
    } else {
        HashSet::new()
    };
    let identity = PartIdentity {
        tokenizer_fingerprint: tokenizer.fingerprint().to_string(),
        chat_template: CHAT_TEMPLATE.to_string(),
        build_fingerprint: fingerprint.clone(),
    };
    let writer = PartWriter::new(
        &settings.out,
        identity,
        settings.target_shard_bytes,
        settings.row_group_rows,
        resume.next_index,
        resume.next_record,
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Internal(format!("thread pool: {e}")))?;

    let bytes_read = Arc::new(AtomicU64::new(0));
    let (raw_tx, raw_rx) = bounded::<Vec<RawRecord>>(4);
    let (row_tx, row_rx) = bounded::<Vec<Processed>>(4);
    let (read_result, write_result) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_all(settings, resume.next_record, raw_tx, &bytes_read));
        let writer = scope.spawn(|| write_all(settings, writer, seen, row_rx, observer));
        let (mut samples, mut quarantined) = (0u64, 0u64);
        for chunk in raw_rx.iter() {
            let out: Vec<Processed> = pool.install(|| {
                chunk
                    .into_par_iter()
                    .map(|r| process(r, settings, &tokenizer))
                    .collect()
            });
            for p in &out {
                match p {
                    Processed::Sample(..) => samples += 1,
                    Processed::Rejected(_) => quarantined += 1,
                }
            }
            if row_tx.send(out).is_err() {
                break; // the writer stopped; its error is reported below
            }
            observer(BuildEvent::Progress {
                input_bytes_read: bytes_read.load(Ordering::Relaxed),
                samples,
                quarantined,
            });
        }
        drop(raw_rx);
        drop(row_tx);
        (join(reader), join(writer))
    });
    // The writer's error is the cause when both failed (the reader then only
    // saw a closed channel).
    match (read_result, write_result) {
        (_, Err(e)) | (Err(e), _) => return Err(e),
        (Ok(total), Ok(writer)) => {
            if let Some(path) = writer.finish(total)? {
                observer(BuildEvent::ShardWritten { path });
            }
        }
    }
    let manifest = write_manifest(settings, &tokenizer, fingerprint, build_args)?;
    summarize(manifest, &settings.out, started, resume.next_record, false)
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("a build thread panicked".into())))
}

/// Marker error for a reader whose consumer went away.
const CLOSED: &str = "pipeline closed";

/// Reads every source in order, numbering records globally, and sends chunks
/// of those at or after `skip_until`. Returns the total number of records.
fn read_all(
    settings: &BuildSettings,
    skip_until: u64,
    tx: Sender<Vec<RawRecord>>,
    bytes_read: &Arc<AtomicU64>,
) -> Result<u64> {
    let mut seq = 0u64;
    let mut chunk = Vec::with_capacity(settings.chunk_records);
    for (index, spec) in settings.sources.iter().enumerate() {
        let result = read_source(spec, bytes_read, &mut |origin, body| {
            if seq >= skip_until {
                chunk.push(RawRecord {
                    seq,
                    source: index,
                    origin,
                    body,
                });
                if chunk.len() >= settings.chunk_records {
                    let full =
                        std::mem::replace(&mut chunk, Vec::with_capacity(settings.chunk_records));
                    tx.send(full).map_err(|_| Error::Internal(CLOSED.into()))?;
                }
            }
            seq += 1;
            Ok(())
        });
        match result {
            Err(Error::Internal(m)) if m == CLOSED => return Ok(seq),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(chunk);
    }
    Ok(seq)
}

fn write_all(
    settings: &BuildSettings,
    mut writer: PartWriter,
    mut seen: HashSet<u128>,
    rx: Receiver<Vec<Processed>>,
    observer: &(dyn Fn(BuildEvent) + Sync),
) -> Result<PartWriter> {
    for chunk in rx.iter() {
        for item in chunk {
            let row = match item {
                Processed::Sample(row, id) if !settings.dedup || seen.insert(id) => {
                    writer.push_sample(*row)?
                }
                Processed::Sample(row, _) => {
                    let detail = format!(
                        "same content as an earlier sample of `{}` (sample_id {})",
                        row.source, row.sample_id
                    );
                    reject(
                        settings,
                        &mut writer,
                        observer,
                        QuarantineRow {
                            seq: row.seq,
                            source: row.source,
                            origin: row.origin,
                            reason: QuarantineReason::Duplicate,
                            detail,
                            annotation_id: row.annotation_id,
                        },
                    )?
                }
                Processed::Rejected(q) => reject(settings, &mut writer, observer, q)?,
            };
            if let Some(path) = row {
                observer(BuildEvent::ShardWritten { path });
                if settings
                    .fail_after_shards
                    .is_some_and(|n| writer.parts() >= n)
                {
                    return Err(Error::Internal(format!(
                        "stopped after {} shards as asked (--fail-after-shards)",
                        writer.parts()
                    )));
                }
            }
        }
    }
    Ok(writer)
}

fn reject(
    settings: &BuildSettings,
    writer: &mut PartWriter,
    observer: &(dyn Fn(BuildEvent) + Sync),
    row: QuarantineRow,
) -> Result<Option<PathBuf>> {
    if settings.strict {
        return Err(Error::Strict {
            origin: row.origin,
            reason: row.reason,
            detail: row.detail,
        });
    }
    observer(BuildEvent::Quarantined {
        origin: row.origin.clone(),
        reason: row.reason,
        detail: row.detail.clone(),
    });
    writer.push_quarantine(row)
}

/// Media, template, tokens and hashes for one record.
fn process(record: RawRecord, settings: &BuildSettings, tokenizer: &ChatTokenizer) -> Processed {
    let source = &settings.sources[record.source].name;
    let RawRecord {
        seq, origin, body, ..
    } = record;
    let result = body.and_then(|raw| {
        let video = settings
            .video_for(record.source)
            .expect("checked when the build started");
        sample_row(raw, seq, &origin, source, settings, &video, tokenizer)
    });
    match result {
        Ok((row, id)) => Processed::Sample(Box::new(row), id),
        Err(r) => Processed::Rejected(QuarantineRow {
            seq,
            source: source.clone(),
            origin,
            reason: r.reason,
            detail: r.detail,
            annotation_id: r.annotation_id,
        }),
    }
}

fn sample_row(
    raw: RawSample,
    seq: u64,
    origin: &str,
    source: &str,
    settings: &BuildSettings,
    video_settings: &VideoSettings,
    tokenizer: &ChatTokenizer,
) -> std::result::Result<(SampleRow, u128), Reject> {
    let id = raw.annotation_id.clone();
    let fail = |reason, detail: String| Reject {
        reason,
        detail,
        annotation_id: id.clone(),
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(raw.kind.as_str().as_bytes());
    for turn in &raw.turns {
        for part in [turn.role, turn.content.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    let mut media = Vec::with_capacity(raw.media.len());
    let mut video = None;
    let mut turns = std::borrow::Cow::Borrowed(&raw.turns);
    for (i, item) in raw.media.iter().enumerate() {
        if let RawMedia::Video {
            path,
            written,
            hints,
        } = item
        {
            let label = format!("video `{written}`");
            let at = |(reason, detail): (QuarantineReason, String)| {
                fail(reason, format!("{label}: {detail}"))
            };
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
            let sampled = crate::video::sample(path, video_settings, *hints).map_err(at)?;
            for frame in sampled.frames {
                let image = encode_rgb(frame.rgb, frame.width, frame.height, &settings.image)
                    .map_err(at)?;
                media.push(MediaItem::new(
                    image,
                    Some((frame.index, frame.timestamp_ms)),
                ));
            }
            // VILA expands a video into one `<image>` and a newline per
            // frame; the stored messages keep the annotation's text.
            let expanded = format!("{}\n", SpecialTokens::IMAGE).repeat(media.len());
            turns = std::borrow::Cow::Owned(
                raw.turns
                    .iter()
                    .map(|t| Segment {
                        role: t.role,
                        content: t
                            .content
                            .replacen(&format!("{}\n", SpecialTokens::VIDEO), &expanded, 1)
                            .replacen(SpecialTokens::VIDEO, &expanded, 1),
                    })
                    .collect(),
            );
            video = Some(VideoInfo {
                duration_ms: sampled.duration_ms,
                fps: sampled.fps,
                codec: sampled.codec,
            });
            continue;
        }
        let (bytes, label) = match item {
            RawMedia::Video { .. } => unreachable!("handled above"),
            RawMedia::Bytes(bytes) => (std::borrow::Cow::Borrowed(bytes), format!("image {i}")),
            RawMedia::File { path, written } => {
                let label = format!("image {i} (`{written}`)");
                match std::fs::read(path) {
                    Ok(bytes) => (std::borrow::Cow::Owned(bytes), label),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let detail = format!("{label}: {} not found", path.display());
                        return Err(fail(QuarantineReason::MissingMedia, detail));
                    }
                    Err(e) => {
                        return Err(fail(
                            QuarantineReason::CorruptMedia,
                            format!("{label}: {e}"),
                        ));
                    }
                }
            }
        };
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        let image = process_image(&bytes, &settings.image)
            .map_err(|(reason, detail)| fail(reason, format!("{label}: {detail}")))?;
        media.push(MediaItem::new(image, None));
    }
    let is_document = turns.iter().all(|t| t.role == "text");
    let encoded = if is_document {
        let text: String = turns.iter().map(|t| t.content.as_str()).collect();
        tokenizer.encode_document(&text)
    } else {
        tokenizer.encode_conversation(&turns)
    };
    let (input_ids, loss_mask) =
        encoded.map_err(|e| fail(QuarantineReason::MalformedJson, e.to_string()))?;
    let content_hash = hasher.finalize().to_hex()[..32].to_string();
    let mut id_hasher = blake3::Hasher::new();
    id_hasher.update(source.as_bytes());
    id_hasher.update(&[0]);
    id_hasher.update(content_hash.as_bytes());
    let id_bytes: [u8; 16] = id_hasher.finalize().as_bytes()[..16]
        .try_into()
        .expect("16 bytes");
    let sample_id = u128::from_be_bytes(id_bytes);
    Ok((
        SampleRow {
            seq,
            sample_id: format!("{sample_id:032x}"),
            source: source.to_string(),
            kind: raw.kind,
            origin: origin.to_string(),
            annotation_id: raw.annotation_id,
            content_hash,
            messages: raw.turns,
            num_images: if video.is_some() {
                0
            } else {
                media.len() as u32
            },
            num_frames: if video.is_some() {
                media.len() as u32
            } else {
                0
            },
            video,
            media,
            input_ids,
            loss_mask,
        },
        sample_id,
    ))
}

/// blake3 of a file when it is at most 2 MiB, else of its first and last MiB.
fn head_tail_hash(path: &Path, len: u64) -> Result<blake3::Hash> {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: usize = 1 << 20;
    let mut file = fs_err::File::open(path)?;
    if len <= 2 * MIB as u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&mut file)?;
        return Ok(hasher.finalize());
    }
    let mut buf = vec![0u8; MIB];
    let mut hasher = blake3::Hasher::new();
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    file.seek(SeekFrom::End(-(MIB as i64)))?;
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    Ok(hasher.finalize())
}

/// The identity of a build: settings that change the output, and for each
/// source its size and a hash of its first and last MiB (cheap on large
/// tars, and enough to tell an edited file from the one a crashed run read).
fn build_fingerprint(
    settings: &BuildSettings,
    tokenizer_fingerprint: &str,
) -> Result<(String, serde_json::Value)> {
    let mut sources = Vec::new();
    for s in &settings.sources {
        let len = s.path.metadata()?.len();
        let sample = head_tail_hash(&s.path, len)?;
        sources.push(serde_json::json!({
            "name": s.name,
            "kind": s.kind,
            "path": s.path,
            "media_root": s.media_root(),
            "frames": s.frames,
            "bytes": len,
            "blake3_head_tail": sample.to_hex().to_string(),
        }));
    }
    let args = serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "chat_template": CHAT_TEMPLATE,
        "image": settings.image,
        "video": settings.video,
        "target_shard_bytes": settings.target_shard_bytes,
        "row_group_rows": settings.row_group_rows,
        "dedup": settings.dedup,
        "sources": sources,
    });
    let fingerprint = blake3::hash(args.to_string().as_bytes()).to_hex()[..32].to_string();
    Ok((fingerprint, args))
}

struct Resume {
    next_index: u32,
    next_record: u64,
}

enum OutState {
    Complete(Manifest),
    Resume(Resume),
}

fn is_lvpipe_file(name: &str) -> bool {
    name == Manifest::FILE_NAME
        || name.ends_with(".tmp")
        || ((name.starts_with("samples-") || name.starts_with("quarantine-"))
            && name.ends_with(".parquet"))
}

fn remove_all_lvpipe_files(out: &Path) -> Result<()> {
    for entry in fs_err::read_dir(out)? {
        let entry = entry?;
        if is_lvpipe_file(&entry.file_name().to_string_lossy()) {
            fs_err::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Row count and key-value metadata of a Parquet file (footer only).
struct FileMeta {
    rows: u64,
    kv: std::collections::HashMap<String, String>,
}

impl FileMeta {
    fn read(path: &Path) -> Result<Self> {
        let file = fs_err::File::open(path)?.into_parts().0;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let meta = builder.metadata().file_metadata();
        let kv = meta
            .key_value_metadata()
            .into_iter()
            .flatten()
            .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
            .collect();
        Ok(FileMeta {
            rows: meta.num_rows() as u64,
            kv,
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.kv.get(key).map(String::as_str)
    }

    fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
}

/// Decides what to do with the output folder: confirm a finished build,
/// resume an interrupted one, or refuse (or clear, with `--overwrite`) a
/// different one. Leftovers of a crash (temporary files, a quarantine file
/// whose samples file never landed) are removed.
fn prepare_out_dir(settings: &BuildSettings, fingerprint: &str) -> Result<OutState> {
    let out = &settings.out;
    let conflict = |what: &str| {
        Error::Conflict(format!(
            "{} holds {what} built from other inputs or settings; pass --overwrite to replace it, or choose another --out",
            out.display()
        ))
    };
    let manifest_path = out.join(Manifest::FILE_NAME);
    if manifest_path.exists() {
        let manifest = Manifest::from_json(&fs_err::read_to_string(&manifest_path)?)?;
        if manifest.build_fingerprint == fingerprint {
            return Ok(OutState::Complete(manifest));
        }
        if !settings.overwrite {
            return Err(conflict("a finished build"));
        }
        remove_all_lvpipe_files(out)?;
    }
    let mut next_index = 0u32;
    let mut next_record = 0u64;
    loop {
        let path = part_file(out, TableKind::Samples, next_index);
        if !path.exists() {
            break;
        }
        let file_meta = FileMeta::read(&path)?;
        if file_meta.get(meta::BUILD_FINGERPRINT) != Some(fingerprint) {
            if !settings.overwrite {
                return Err(conflict("shards of an unfinished build"));
            }
            remove_all_lvpipe_files(out)?;
            return Ok(OutState::Resume(Resume {
                next_index: 0,
                next_record: 0,
            }));
        }
        next_record = file_meta.get_u64(meta::RECORD_END).ok_or_else(|| {
            Error::Conflict(format!("{} lacks {}", path.display(), meta::RECORD_END))
        })?;
        next_index += 1;
    }
    for entry in fs_err::read_dir(out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_part = name
            .strip_suffix(".parquet")
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, i)| i.parse::<u32>().ok())
            .is_some_and(|i| i >= next_index);
        if is_lvpipe_file(&name) && (name.ends_with(".tmp") || stale_part) {
            fs_err::remove_file(entry.path())?;
        }
    }
    Ok(OutState::Resume(Resume {
        next_index,
        next_record,
    }))
}

/// Reads some string columns of every file of a table, in part order.
fn scan_strings(
    out: &Path,
    table: TableKind,
    parts: u32,
    columns: &[&str],
    mut f: impl FnMut(&[&str]),
) -> Result<()> {
    use arrow::array::AsArray;
    for index in 0..parts {
        let path = part_file(out, table, index);
        if !path.exists() {
            continue;
        }
        let file = fs_err::File::open(&path)?.into_parts().0;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let cols: Vec<_> = columns
                .iter()
                .map(|c| {
                    batch
                        .column_by_name(c)
                        .map(|a| a.as_string::<i32>().clone())
                })
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::Internal(format!("{}: missing columns {columns:?}", path.display()))
                })?;
            for row in 0..batch.num_rows() {
                let values: Vec<&str> = cols.iter().map(|c| c.value(row)).collect();
                f(&values);
            }
        }
    }
    Ok(())
}

fn existing_sample_ids(out: &Path, parts: u32) -> Result<HashSet<u128>> {
    let mut seen = HashSet::new();
    scan_strings(out, TableKind::Samples, parts, &["sample_id"], |v| {
        if let Ok(id) = u128::from_str_radix(v[0], 16) {
            seen.insert(id);
        }
    })?;
    Ok(seen)
}

fn write_manifest(
    settings: &BuildSettings,
    tokenizer: &ChatTokenizer,
    build_fingerprint: String,
    build_args: serde_json::Value,
) -> Result<Manifest> {
    let out = &settings.out;
    let mut shards = Vec::new();
    let mut index = 0u32;
    while part_file(out, TableKind::Samples, index).exists() {
        for table in [TableKind::Quarantine, TableKind::Samples] {
            let path = part_file(out, table, index);
            if !path.exists() {
                continue;
            }
            let file_meta = FileMeta::read(&path)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(fs_err::File::open(&path)?)?;
            let missing = |key| Error::Internal(format!("{} lacks {key}", path.display()));
            shards.push(ManifestShard {
                file: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                table,
                rows: file_meta.rows,
                bytes: path.metadata()?.len(),
                blake3: hasher.finalize().to_hex().to_string(),
                record_start: file_meta
                    .get_u64(meta::RECORD_START)
                    .ok_or_else(|| missing(meta::RECORD_START))?,
                record_end: file_meta
                    .get_u64(meta::RECORD_END)
                    .ok_or_else(|| missing(meta::RECORD_END))?,
            });
        }
        index += 1;
    }
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    scan_strings(out, TableKind::Samples, index, &["source"], |v| {
        counts.entry(v[0].to_string()).or_default().0 += 1
    })?;
    scan_strings(out, TableKind::Quarantine, index, &["source"], |v| {
        counts.entry(v[0].to_string()).or_default().1 += 1
    })?;
    let sources = settings
        .sources
        .iter()
        .map(|s| {
            let (samples, quarantined) = counts.get(&s.name).copied().unwrap_or_default();
            ManifestSource {
                name: s.name.clone(),
                kind: s.kind.as_str().to_string(),
                path: s.path.display().to_string(),
                media_root: s.media_root.as_ref().map(|p| p.display().to_string()),
                records: samples + quarantined,
                samples,
                quarantined,
            }
        })
        .collect();
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION.to_string(),
        lvpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        tokenizer_fingerprint: tokenizer.fingerprint().to_string(),
        chat_template: CHAT_TEMPLATE.to_string(),
        build_fingerprint,
        build_args,
        sources,
        shards,
    };
    let path = out.join(Manifest::FILE_NAME);
    write_atomic(&path, manifest.to_json().as_bytes())?;
    Ok(manifest)
}

fn summarize(
    manifest: Manifest,
    out: &Path,
    started: Instant,
    resumed_records: u64,
    up_to_date: bool,
) -> Result<BuildSummary> {
    let mut by_reason = BTreeMap::new();
    let parts = manifest
        .shards
        .iter()
        .filter(|s| s.table == TableKind::Samples)
        .count() as u32;
    scan_strings(out, TableKind::Quarantine, parts, &["reason"], |v| {
        *by_reason.entry(v[0].to_string()).or_default() += 1
    })?;
    Ok(BuildSummary {
        samples: manifest.sources.iter().map(|s| s.samples).sum(),
        quarantined: manifest.sources.iter().map(|s| s.quarantined).sum(),
        by_reason,
        shards: parts as usize,
        bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
        resumed_records,
        up_to_date,
        manifest,
    })
}
