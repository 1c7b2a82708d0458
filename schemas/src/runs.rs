//! The records of a training run: `metrics.jsonl` (one [`StepMetrics`] per
//! optimizer step) and `lineage.parquet`, and the SQL tables made of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Error, Result};

/// One line of a run's `metrics.jsonl`: what one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done, this one included (1-based).
    pub step: u64,
    /// Mean loss over the step's trained tokens (NaN, written `null`, when
    /// it diverged).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Tokens in the step's packs (media expanded), padding excluded.
    pub tokens: u64,
    /// Tokens the loss covered.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss_tokens: f64,
    /// Forward and backward passes the gradients accumulated over.
    #[serde(default)]
    pub micro_batches: usize,
    pub stage: usize,
    #[serde(default, deserialize_with = "nan_if_null")]
    pub rope_base: f64,
    /// Tokens per source in this step.
    #[serde(default)]
    pub source_tokens: BTreeMap<String, u64>,
    #[serde(default, deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    /// Seconds since the run (or its resume) started.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub elapsed_s: f64,
    /// The loss-scaling factor of the step (f16 compute only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The step's gradients overflowed under loss scaling, so no weight
    /// changed (its `grad_norm` is `null`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

impl StepMetrics {
    pub const FILE_NAME: &'static str = "metrics.jsonl";

    /// The JSON line of this step (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("metrics serialize")
    }

    /// Every step of a `metrics.jsonl`; a line that does not parse is an
    /// error naming the file and the line. Blank lines are skipped.
    pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Format {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|e| Error::Format {
                    file: format!("{}, line {}", path.display(), i + 1),
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Schema of `lineage.parquet`: one row per sample per step.
pub fn lineage_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stage", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("epoch", DataType::UInt64, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("pack_id", DataType::UInt32, false),
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("chunk", DataType::UInt32, false),
        Field::new("tokens", DataType::UInt32, false),
    ]))
}

/// Schema of the `metrics` table: one row per optimizer step of every run.
pub fn metrics_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("stage", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("loss", DataType::Float64, true),
        Field::new("lr", DataType::Float64, true),
        Field::new("grad_norm", DataType::Float64, true),
        Field::new("tokens", DataType::UInt64, false),
        Field::new("loss_tokens", DataType::Float64, true),
        Field::new("tokens_per_s", DataType::Float64, true),
        Field::new("elapsed_s", DataType::Float64, true),
    ]))
}

/// Schema of the `source_tokens` table: tokens per source per step.
pub fn source_tokens_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("stage", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("tokens", DataType::UInt64, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_round_trip_and_bad_lines_name_file_and_line() {
        let step = StepMetrics {
            step: 3,
            loss: f64::NAN,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 100,
            loss_tokens: 40.0,
            micro_batches: 1,
            stage: 2,
            rope_base: 1e4,
            source_tokens: BTreeMap::from([("sft".to_string(), 100)]),
            tokens_per_s: 10.0,
            elapsed_s: 1.0,
            loss_scale: Some(32768.0),
            skipped: true,
        };
        let line = step.to_line();
        assert!(line.contains("\"loss\":null"), "{line}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(StepMetrics::FILE_NAME);
        std::fs::write(&path, format!("{line}\n\n{{\"step\": 4}}\n")).unwrap();
        let err = StepMetrics::read(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl, line 3"), "{err}");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let back = StepMetrics::read(&path).unwrap();
        assert!(back[0].loss.is_nan());
        assert_eq!(back[0].source_tokens, step.source_tokens);
        assert_eq!((back[0].loss_scale, back[0].skipped), (Some(32768.0), true));
        // f32 and bf16 steps write neither field.
        let plain = StepMetrics {
            loss_scale: None,
            skipped: false,
            ..back.into_iter().next().unwrap()
        };
        let line = plain.to_line();
        assert!(
            !line.contains("loss_scale") && !line.contains("skipped"),
            "{line}"
        );
    }
}
