//! The build's three stages: one reader thread numbering records in order,
//! chunks processed in parallel, one writer cutting shards in record order.
//! Bounded channels between them keep memory flat whatever the input size.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use lvpipe_schemas::QuarantineReason;

use super::sample::{MediaRoot, Prep, SourcePrep, sample_row};
use super::{BuildEvent, BuildSettings};
use crate::chat::ChatTokenizer;
use crate::readers::{Body, InputBytes, RawMedia, ReadLimits, read_source};
use crate::writer::{PartWriter, QuarantineRow, SampleRow};
use crate::{Error, Result};

/// A record on its way through the pipeline.
pub(super) struct RawRecord {
    seq: u64,
    source: usize,
    origin: String,
    body: Body,
}

impl RawRecord {
    /// Whether `partition` builds this record: by a hash of its kind, turns,
    /// token ids and media sizes (a stat, not a read). Duplicates (the same
    /// kind, turns and media bytes, whatever the files' names) hash alike,
    /// so a duplicate always meets its original in one task and is
    /// quarantined as in one build; the sizes spread records that share a
    /// prompt and answer over the tasks. Records that did not parse go by
    /// their number.
    pub(super) fn belongs_to(&self, partition: Option<super::Partition>) -> bool {
        let Some(p) = partition else {
            return true;
        };
        let key = match &self.body {
            Ok(raw) => {
                let mut hasher = blake3::Hasher::new();
                super::sample::hash_text(&mut hasher, raw);
                for id in raw.tokens.iter().flatten() {
                    hasher.update(&id.to_le_bytes());
                }
                for media in &raw.media {
                    let size = match media {
                        RawMedia::Bytes(bytes) => bytes.len() as u64,
                        RawMedia::Member { size, .. } => *size,
                        RawMedia::File { path, .. } | RawMedia::Video { path, .. } => {
                            std::fs::metadata(path).map_or(u64::MAX, |m| m.len())
                        }
                    };
                    hasher.update(&size.to_le_bytes());
                }
                let bytes = hasher.finalize();
                u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
            }
            Err(_) => self.seq,
        };
        key % u64::from(p.count) == u64::from(p.index)
    }
}

pub(super) enum Processed {
    Sample(Box<SampleRow>, u128),
    Rejected(QuarantineRow),
}

/// Reads every source in order, numbering records globally, and sends chunks
/// of those at or after `skip_until`. Returns the total number of records.
pub(super) fn read_all(
    settings: &BuildSettings,
    skip_until: u64,
    tx: Sender<Vec<RawRecord>>,
    bytes: &Arc<InputBytes>,
) -> Result<u64> {
    let mut seq = 0u64;
    let mut chunk = Vec::with_capacity(settings.chunk_records);
    for (index, spec) in settings.sources.iter().enumerate() {
        let limits = ReadLimits {
            record_bytes: settings.max_record_bytes,
            member_bytes: settings.image.limits.max_bytes,
        };
        let result = read_source(spec, bytes, limits, &mut |origin, body| {
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
                    tx.send(full).map_err(|_| Error::Stopped)?;
                }
            }
            seq += 1;
            Ok(())
        });
        match result {
            Err(Error::Stopped) => return Ok(seq),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(chunk);
    }
    Ok(seq)
}

pub(super) fn write_all(
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
                    return Err(Error::StoppedAsAsked(writer.parts()));
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
pub(super) fn process(
    record: RawRecord,
    settings: &BuildSettings,
    sources: &[SourcePrep],
    tokenizer: &ChatTokenizer,
    input: &InputBytes,
) -> Processed {
    let source = &settings.sources[record.source].name;
    let RawRecord {
        seq, origin, body, ..
    } = record;
    let result = body.and_then(|raw| {
        let prep = Prep {
            settings,
            video: sources[record.source].video,
            root: MediaRoot {
                root: &sources[record.source].root,
                allow_outside: settings.allow_media_outside_root,
            },
            input,
        };
        sample_row(raw, seq, &origin, source, &prep, tokenizer)
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
