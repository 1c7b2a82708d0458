//! The manifest, written last: every shard with its rows, bytes and
//! checksum, the sources' counts and the build's arguments; and the summary
//! a build returns, read back from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use lvpipe_schemas::{Manifest, ManifestShard, ManifestSource, SCHEMA_VERSION, TableKind, meta};

use super::resume::{FileMeta, scan_strings};
use super::{BuildSettings, BuildSummary};
use crate::chat::ChatTokenizer;
use crate::writer::{part_file, write_atomic};
use crate::{Error, Result};

pub(super) fn write_manifest(
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
            let missing = |key| Error::Conflict(format!("{} lacks {key}", path.display()));
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
        added_tokens: tokenizer.added().iter().map(|t| t.to_string()).collect(),
        chat_template: settings.chat_template.as_str().to_string(),
        build_fingerprint,
        build_args,
        sources,
        shards,
    };
    // The tokenizer the shards were made with (with any tokens it gained):
    // what `train` and `generate` take to read them.
    write_atomic(&out.join("tokenizer.json"), tokenizer.json())?;
    let path = out.join(Manifest::FILE_NAME);
    write_atomic(&path, manifest.to_json().as_bytes())?;
    Ok(manifest)
}

pub(super) fn summarize(
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
        input_bytes_read: 0,
        manifest,
    })
}
