//! `manifest.json`: the list of shards a build wrote, written last.

use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray, UInt64Array};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, manifest_schema};

/// Which table a shard file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    Samples,
    Quarantine,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Samples => "samples",
            TableKind::Quarantine => "quarantine",
        }
    }

    /// File name prefix of this table's shards (`samples-00003.parquet`).
    pub fn file_prefix(self) -> &'static str {
        self.as_str()
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    /// File name relative to the shard folder.
    pub file: String,
    pub table: TableKind,
    pub rows: u64,
    pub bytes: u64,
    /// blake3 of the file's bytes, hex.
    pub blake3: String,
    /// Input records `[record_start, record_end)` (global sequence numbers) the file covers.
    pub record_start: u64,
    pub record_end: u64,
}

/// One input source of the build and what became of its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSource {
    pub name: String,
    pub kind: String,
    pub path: String,
    pub media_root: Option<String>,
    /// Records read (samples + quarantined).
    pub records: u64,
    pub samples: u64,
    pub quarantined: u64,
}

/// The manifest of a shard folder. Its presence means the build finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: String,
    pub lvpipe_version: String,
    pub tokenizer_fingerprint: String,
    /// Special tokens the given tokenizer lacked and the build added (a
    /// stock Qwen2 or Llama tokenizer gets `<image>` and `<video>`); the
    /// tokenizer with them is the folder's `tokenizer.json`.
    #[serde(default)]
    pub added_tokens: Vec<String>,
    pub chat_template: String,
    pub build_fingerprint: String,
    /// The resolved build settings, as given (for provenance).
    pub build_args: serde_json::Value,
    pub sources: Vec<ManifestSource>,
    pub shards: Vec<ManifestShard>,
}

impl Manifest {
    pub const FILE_NAME: &'static str = "manifest.json";

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::SchemaMismatch {
            table: "manifest",
            message: e.to_string(),
        })
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data to a String cannot fail.
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }

    /// The shards as a record batch of [`manifest_schema`], for SQL.
    pub fn to_record_batch(&self) -> Result<RecordBatch> {
        let s = &self.shards;
        let strings = |f: &dyn Fn(&ManifestShard) -> String| {
            Arc::new(StringArray::from_iter_values(s.iter().map(f)))
        };
        let ints = |f: &dyn Fn(&ManifestShard) -> u64| {
            Arc::new(UInt64Array::from_iter_values(s.iter().map(f)))
        };
        Ok(RecordBatch::try_new(
            manifest_schema(),
            vec![
                strings(&|x| x.file.clone()),
                strings(&|x| x.table.as_str().to_string()),
                ints(&|x| x.rows),
                ints(&|x| x.bytes),
                strings(&|x| x.blake3.clone()),
                ints(&|x| x.record_start),
                ints(&|x| x.record_end),
                strings(&|_| self.schema_version.clone()),
                strings(&|_| self.tokenizer_fingerprint.clone()),
            ],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_becomes_a_table() {
        let m = Manifest {
            schema_version: "1".into(),
            lvpipe_version: "0.1.0".into(),
            tokenizer_fingerprint: "abc".into(),
            added_tokens: vec![],
            chat_template: "chatml".into(),
            build_fingerprint: "f".into(),
            build_args: serde_json::json!({"image_size": 384}),
            sources: vec![],
            shards: vec![ManifestShard {
                file: "samples-00000.parquet".into(),
                table: TableKind::Samples,
                rows: 7,
                bytes: 100,
                blake3: "00".into(),
                record_start: 0,
                record_end: 9,
            }],
        };
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let batch = m.to_record_batch().unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), manifest_schema());
    }
}
