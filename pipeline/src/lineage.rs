//! Training lineage and run records as tables: which samples each step
//! trained on (`lineage.parquet`, written by the trainer at the end of a
//! stage), and the per-step metrics, for `lvpipe sql --runs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use lvpipe_schemas::{StepMetrics, lineage_schema, metrics_schema, source_tokens_schema};

use crate::Result;
use crate::loader::Loader;

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

/// The lineage of every rank of a `world_size`-process run, rank after
/// rank: each sample with the data-parallel rank that trained it.
pub fn group_lineage(
    mix: &Arc<crate::Mix>,
    stage: usize,
    steps: u64,
    world_size: u32,
) -> Result<RecordBatch> {
    let batches = (0..world_size)
        .map(|rank| lineage(&Loader::new(mix.clone(), rank, world_size)?, stage, steps))
        .collect::<Result<Vec<_>>>()?;
    Ok(arrow::compute::concat_batches(&lineage_schema(), &batches)?)
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

/// Run folders under `runs`: `runs` itself and its sub-folders that hold a
/// `metrics.jsonl`, sorted by name.
pub fn run_dirs(runs: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    if runs.join(StepMetrics::FILE_NAME).exists() {
        dirs.push(runs.to_path_buf());
    }
    let mut subs: Vec<PathBuf> = fs_err::read_dir(runs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(StepMetrics::FILE_NAME).exists())
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
        let path = dir.join(StepMetrics::FILE_NAME);
        for step in StepMetrics::read(&path)? {
            let stage = step.stage as u32;
            m.run.push(run.clone());
            m.stage.push(stage);
            m.step.push(step.step);
            m.loss.push(finite(step.loss));
            m.lr.push(finite(step.lr));
            m.grad_norm.push(finite(step.grad_norm));
            m.tokens.push(step.tokens);
            m.loss_tokens.push(finite(step.loss_tokens));
            m.tokens_per_s.push(finite(step.tokens_per_s));
            m.elapsed_s.push(finite(step.elapsed_s));
            for (source, tokens) in step.source_tokens {
                s_run.push(run.clone());
                s_stage.push(stage);
                s_step.push(step.step);
                s_source.push(source);
                s_tokens.push(tokens);
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

/// A number as SQL shows it: NaN (a diverged loss) as NULL.
fn finite(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
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
