//! Training lineage and run records as tables: which samples each step
//! trained on (`lineage.parquet`, written by the trainer at the end of a
//! stage), and the per-step metrics, for `lvpipe sql --runs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::loader::Loader;
use crate::{Error, Result};

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

/// The lineage of steps `0..steps` of `loader` (its rank), replayed from
/// the mix's order: no tokens or media are read. The k-th step here is
/// global step k, counted from 1 like the metrics (`step` = optimizer step).
pub fn lineage(loader: &Loader, stage: usize, steps: u64) -> Result<RecordBatch> {
    let mut cols = LineageColumns::default();
    for step in 0..steps {
        let (epoch, packs) = loader.pack_ids(step);
        for pack_id in packs {
            for (sample_id, source, chunk, tokens) in loader.mix().pack_members(pack_id)? {
                cols.stage.push(stage as u32);
                cols.step.push(step + 1);
                cols.epoch.push(epoch);
                cols.rank.push(loader.rank());
                cols.pack_id.push(pack_id);
                cols.sample_id.push(sample_id);
                cols.source.push(source);
                cols.chunk.push(chunk);
                cols.tokens.push(tokens);
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(cols.stage)),
        Arc::new(UInt64Array::from(cols.step)),
        Arc::new(UInt64Array::from(cols.epoch)),
        Arc::new(UInt32Array::from(cols.rank)),
        Arc::new(UInt32Array::from(cols.pack_id)),
        Arc::new(StringArray::from(cols.sample_id)),
        Arc::new(StringArray::from(cols.source)),
        Arc::new(UInt32Array::from(cols.chunk)),
        Arc::new(UInt32Array::from(cols.tokens)),
    ];
    Ok(RecordBatch::try_new(lineage_schema(), columns)?)
}

#[derive(Default)]
struct LineageColumns {
    stage: Vec<u32>,
    step: Vec<u64>,
    epoch: Vec<u64>,
    rank: Vec<u32>,
    pack_id: Vec<u32>,
    sample_id: Vec<String>,
    source: Vec<String>,
    chunk: Vec<u32>,
    tokens: Vec<u32>,
}

/// Writes `batch` as one zstd-compressed Parquet file, atomically.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<()> {
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    let tmp = path.with_extension("parquet.tmp");
    let file = fs_err::File::create(&tmp)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    fs_err::rename(&tmp, path)?;
    Ok(())
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

/// Run folders under `runs`: `runs` itself and its sub-folders that hold a
/// `metrics.jsonl`, sorted by name.
pub fn run_dirs(runs: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    if runs.join("metrics.jsonl").exists() {
        dirs.push(runs.to_path_buf());
    }
    let mut subs: Vec<PathBuf> = fs_err::read_dir(runs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("metrics.jsonl").exists())
        .collect();
    subs.sort();
    dirs.extend(subs);
    Ok(dirs)
}

/// The metrics of `dirs` as two tables: per step, and per step and source.
/// Each line of a `metrics.jsonl` that does not parse is an error naming
/// the file and line.
pub fn metrics_tables(dirs: &[PathBuf]) -> Result<(RecordBatch, RecordBatch)> {
    let mut m = MetricColumns::default();
    let (mut s_run, mut s_stage, mut s_step, mut s_source, mut s_tokens) =
        (vec![], vec![], vec![], vec![], vec![]);
    for dir in dirs {
        let run = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join("metrics.jsonl");
        let text = fs_err::read_to_string(&path)?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Shards {
                path: path.clone(),
                message: format!("line {}: {e}", i + 1),
            })?;
            let int = |k: &str| v[k].as_u64().unwrap_or(0);
            let float = |k: &str| v[k].as_f64();
            let (stage, step) = (int("stage") as u32, int("step"));
            m.run.push(run.clone());
            m.stage.push(stage);
            m.step.push(step);
            m.loss.push(float("loss"));
            m.lr.push(float("lr"));
            m.grad_norm.push(float("grad_norm"));
            m.tokens.push(int("tokens"));
            m.loss_tokens.push(float("loss_tokens"));
            m.tokens_per_s.push(float("tokens_per_s"));
            m.elapsed_s.push(float("elapsed_s"));
            if let Some(sources) = v["source_tokens"].as_object() {
                for (source, tokens) in sources {
                    s_run.push(run.clone());
                    s_stage.push(stage);
                    s_step.push(step);
                    s_source.push(source.clone());
                    s_tokens.push(tokens.as_u64().unwrap_or(0));
                }
            }
        }
    }
    let metrics = RecordBatch::try_new(
        metrics_schema(),
        vec![
            Arc::new(StringArray::from(m.run)),
            Arc::new(UInt32Array::from(m.stage)),
            Arc::new(UInt64Array::from(m.step)),
            Arc::new(Float64Array::from(m.loss)),
            Arc::new(Float64Array::from(m.lr)),
            Arc::new(Float64Array::from(m.grad_norm)),
            Arc::new(UInt64Array::from(m.tokens)),
            Arc::new(Float64Array::from(m.loss_tokens)),
            Arc::new(Float64Array::from(m.tokens_per_s)),
            Arc::new(Float64Array::from(m.elapsed_s)),
        ],
    )?;
    let sources = RecordBatch::try_new(
        source_tokens_schema(),
        vec![
            Arc::new(StringArray::from(s_run)),
            Arc::new(UInt32Array::from(s_stage)),
            Arc::new(UInt64Array::from(s_step)),
            Arc::new(StringArray::from(s_source)),
            Arc::new(UInt64Array::from(s_tokens)),
        ],
    )?;
    Ok((metrics, sources))
}

#[derive(Default)]
struct MetricColumns {
    run: Vec<String>,
    stage: Vec<u32>,
    step: Vec<u64>,
    loss: Vec<Option<f64>>,
    lr: Vec<Option<f64>>,
    grad_norm: Vec<Option<f64>>,
    tokens: Vec<u64>,
    loss_tokens: Vec<Option<f64>>,
    tokens_per_s: Vec<Option<f64>>,
    elapsed_s: Vec<Option<f64>>,
}
