//! What an output folder already holds: a finished build (nothing to do),
//! the shards of a crashed one (resume after them), or another build
//! (refused, or replaced with `--overwrite`).

use std::collections::HashSet;
use std::path::Path;

use lvpipe_schemas::{Manifest, TableKind, meta};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::BuildSettings;
use crate::writer::part_file;
use crate::{Error, Result};

pub(super) struct Resume {
    pub(super) next_index: u32,
    pub(super) next_record: u64,
}

pub(super) enum OutState {
    Complete(Box<Manifest>),
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
pub(super) struct FileMeta {
    pub(super) rows: u64,
    pub(super) kv: std::collections::HashMap<String, String>,
}

impl FileMeta {
    pub(super) fn read(path: &Path) -> Result<Self> {
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

    pub(super) fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
}

/// Decides what to do with the output folder: confirm a finished build,
/// resume an interrupted one, or refuse (or clear, with `--overwrite`) a
/// different one. Leftovers of a crash (temporary files, a quarantine file
/// whose samples file never landed) are removed.
pub(super) fn prepare_out_dir(settings: &BuildSettings, fingerprint: &str) -> Result<OutState> {
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
            return Ok(OutState::Complete(Box::new(manifest)));
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
pub(super) fn scan_strings(
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
                    Error::Conflict(format!("{}: missing columns {columns:?}", path.display()))
                })?;
            for row in 0..batch.num_rows() {
                let values: Vec<&str> = cols.iter().map(|c| c.value(row)).collect();
                f(&values);
            }
        }
    }
    Ok(())
}

pub(super) fn existing_sample_ids(out: &Path, parts: u32) -> Result<HashSet<u128>> {
    let mut seen = HashSet::new();
    scan_strings(out, TableKind::Samples, parts, &["sample_id"], |v| {
        if let Ok(id) = u128::from_str_radix(v[0], 16) {
            seen.insert(id);
        }
    })?;
    Ok(seen)
}
