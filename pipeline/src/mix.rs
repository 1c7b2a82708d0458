//! `mix --stage N`: a stage's sources selected, weighted, ordered and packed.
//!
//! Output, in `OUT/stage-N/`:
//! - `samples.arrow`: one row per packed sample instance, in pack order
//!   (`pack_id`, `sample_id`, `source`, `chunk`, `num_media`, `expanded_len`,
//!   `input_ids`, `loss_mask`); the loader memory-maps it;
//! - `packs.arrow`: one row per pack (`pack_id`, `first_row`, `num_samples`,
//!   `tokens`, `waste`);
//! - `mix_report.arrow`: target and realized share per source;
//! - `mix.json`: what the loader needs (context, seed, global batch, steps).
//!
//! Same shards, recipe and stage give byte-identical files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArray, Float64Array, ListArray, RecordBatch, StringArray, UInt8Array,
    UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt8Type, UInt32Type};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::recipe::{LongSamples, Order, Recipe, Stage, WeightBy};
use crate::{Error, Result};

/// `mix.json`: how a mix was made and what the loader needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixMeta {
    pub stage: usize,
    pub name: String,
    pub context: u32,
    pub seed: u64,
    pub global_batch: u32,
    pub epochs: Option<u32>,
    pub steps: Option<u64>,
    pub tokens_per_media: u32,
    /// `sequential`: the loader visits the packs in the mix's own order.
    #[serde(default)]
    pub order: Order,
    /// Side of the square pixels the loader decodes media to.
    pub image_size: u32,
    pub recipe_fingerprint: String,
    pub shards_build_fingerprint: String,
    pub tokenizer_fingerprint: String,
    pub samples: u64,
    pub packs: u64,
    pub tokens: u64,
    pub padding: u64,
}

impl MixMeta {
    pub const FILE_NAME: &'static str = "mix.json";
}

/// One row of `mix_report`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    pub source: String,
    /// Samples the query selected.
    pub selected: u64,
    /// Samples left out for being longer than the context (not chunkable).
    pub too_long: u64,
    pub target_share: f64,
    pub realized_share: f64,
    /// Sample instances in the mix (repeats and chunks counted).
    pub samples: u64,
    pub tokens: u64,
}

/// Where each sample instance comes from: its batch and row, and the token
/// range (a chunk of a long document, or the whole sample).
#[derive(Debug, Clone, Copy)]
struct Unit {
    source: usize,
    batch: usize,
    row: usize,
    start: u32,
    end: u32,
    chunk: u32,
    expanded: u32,
}

/// Selected rows of one stage: the query results and the units cut from them.
pub(crate) struct Selection {
    pub batches: Vec<RecordBatch>,
    units: Vec<Vec<Unit>>,
    pub reports: Vec<SourceReport>,
}

const SELECT_COLUMNS: &str =
    "sample_id, source, kind, num_images, num_frames, input_ids, loss_mask, media";

/// Runs each source's query and cuts its rows into units that fit the context.
pub(crate) async fn select(catalog: &Catalog, recipe: &Recipe, stage: &Stage) -> Result<Selection> {
    let tpm = recipe.model.tokens_per_media();
    let mut batches = Vec::new();
    let mut units = Vec::new();
    let mut reports = Vec::new();
    for (index, source) in stage.sources.iter().enumerate() {
        // A stable base order, whatever order the files are scanned in.
        let sql = format!("{} ORDER BY sample_id", source.sql(SELECT_COLUMNS));
        let result = catalog.query(&sql).await.map_err(|e| {
            Error::Recipe(format!(
                "stage `{}`, source `{}`: {e}",
                stage.name, source.name
            ))
        })?;
        let mut these = Vec::new();
        let (mut selected, mut too_long) = (0u64, 0u64);
        for batch in result {
            let b = batches.len();
            let ids = batch
                .column_by_name("input_ids")
                .expect("selected")
                .as_list::<i32>();
            let kinds = batch
                .column_by_name("kind")
                .expect("selected")
                .as_string::<i32>();
            let imgs = batch
                .column_by_name("num_images")
                .expect("selected")
                .as_primitive::<UInt32Type>();
            let frames = batch
                .column_by_name("num_frames")
                .expect("selected")
                .as_primitive::<UInt32Type>();
            for row in 0..batch.num_rows() {
                selected += 1;
                let len = ids.value_length(row) as u32;
                let media = imgs.value(row) + frames.value(row);
                let expanded = len + media * tpm.saturating_sub(1);
                if expanded <= stage.context {
                    these.push(Unit {
                        source: index,
                        batch: b,
                        row,
                        start: 0,
                        end: len,
                        chunk: 0,
                        expanded,
                    });
                } else if stage.long_samples == LongSamples::Chunk
                    && media == 0
                    && kinds.value(row) == "text"
                {
                    let mut start = 0;
                    let mut chunk = 0;
                    while start < len {
                        let end = (start + stage.context).min(len);
                        these.push(Unit {
                            source: index,
                            batch: b,
                            row,
                            start,
                            end,
                            chunk,
                            expanded: end - start,
                        });
                        start = end;
                        chunk += 1;
                    }
                } else {
                    too_long += 1;
                }
            }
            batches.push(batch);
        }
        reports.push(SourceReport {
            source: source.name.clone(),
            selected,
            too_long,
            target_share: 0.0,
            realized_share: 0.0,
            samples: 0,
            tokens: 0,
        });
        units.push(these);
    }
    Ok(Selection {
        batches,
        units,
        reports,
    })
}

/// How many instances of each source's units the stage takes, and which.
fn instances(stage: &Stage, selection: &mut Selection, rng: &mut SmallRng) -> Vec<Unit> {
    let by_tokens = stage.weight_by == WeightBy::Tokens;
    let size = |u: &[Unit]| -> f64 {
        if by_tokens {
            u.iter().map(|x| f64::from(x.expanded)).sum()
        } else {
            u.len() as f64
        }
    };
    let natural: Vec<f64> = stage
        .sources
        .iter()
        .zip(&selection.units)
        .map(|(s, u)| size(u) * f64::from(s.repeat.unwrap_or(1)))
        .collect();
    let total: f64 = natural.iter().sum();
    let weights: Vec<f64> = match stage.sources.iter().all(|s| s.weight.is_some()) {
        true => stage
            .sources
            .iter()
            .map(|s| s.weight.unwrap_or(0.0))
            .collect(),
        false => natural.clone(),
    };
    let weight_sum: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut out = Vec::new();
    for (i, units) in selection.units.iter().enumerate() {
        let target = weights[i] / weight_sum;
        selection.reports[i].target_share = target;
        if units.is_empty() {
            continue;
        }
        // Instances needed: a share of the stage's natural size, in samples
        // (or in tokens, through this source's mean length).
        let mean = size(units) / units.len() as f64;
        let want = match stage.sources[i].repeat {
            Some(r) if stage.sources[i].weight.is_none() => units.len() * r as usize,
            _ => (total * target / if by_tokens { mean } else { 1.0 })
                .round()
                .max(1.0) as usize,
        };
        for _ in 0..want / units.len() {
            out.extend_from_slice(units);
        }
        let mut rest: Vec<Unit> = units.clone();
        rest.shuffle(rng);
        out.extend_from_slice(&rest[..want % units.len()]);
    }
    out
}

/// A stage selected, weighted, ordered and packed, in memory.
pub(crate) struct PlannedStage {
    pub selection: Selection,
    order: Vec<Unit>,
    pub packs: Vec<Pack>,
    pub tokens: u64,
}

impl PlannedStage {
    pub fn samples(&self) -> usize {
        self.order.len()
    }
}

/// Everything `mix` decides, without writing: `plan` reports it.
pub(crate) async fn plan_stage(
    catalog: &Catalog,
    recipe: &Recipe,
    stage: &Stage,
) -> Result<PlannedStage> {
    let mut selection = select(catalog, recipe, stage).await?;
    let mut rng = SmallRng::seed_from_u64(stage.seed);
    let mut order = instances(stage, &mut selection, &mut rng);
    order.shuffle(&mut rng);
    if stage.order == Order::Sequential {
        // Stable: each part keeps its shuffled order.
        order.sort_by_key(|u| stage.sources[u.source].part(u.source));
    }
    let packs = pack(&order, stage.context);
    let tokens: u64 = order.iter().map(|u| u64::from(u.expanded)).sum();
    for unit in &order {
        let r = &mut selection.reports[unit.source];
        r.samples += 1;
        r.tokens += u64::from(unit.expanded);
    }
    let by_tokens = stage.weight_by == WeightBy::Tokens;
    for r in &mut selection.reports {
        r.realized_share = match (by_tokens, tokens, order.len()) {
            (_, 0, _) | (_, _, 0) => 0.0,
            (true, t, _) => r.tokens as f64 / t as f64,
            (false, _, n) => r.samples as f64 / n as f64,
        };
    }
    Ok(PlannedStage {
        selection,
        order,
        packs,
        tokens,
    })
}

/// The mix of `stage_number` already in `out/stage-N/`, when it was made
/// from this recipe and these shards: a mix is a pure function of them (same
/// inputs, byte-identical files) and its `mix.json` is written last, so it
/// need not be built again.
pub fn current_mix(
    catalog: &Catalog,
    recipe: &Recipe,
    stage_number: usize,
    out: &Path,
) -> Option<MixMeta> {
    let path = out
        .join(format!("stage-{stage_number}"))
        .join(MixMeta::FILE_NAME);
    let meta: MixMeta = serde_json::from_str(&fs_err::read_to_string(path).ok()?).ok()?;
    let manifest = catalog.manifest().ok()?;
    (meta.stage == stage_number
        && meta.recipe_fingerprint == recipe.fingerprint()
        && meta.shards_build_fingerprint == manifest.build_fingerprint
        && meta.tokenizer_fingerprint == manifest.tokenizer_fingerprint)
        .then_some(meta)
}

/// Builds the mix of `stage_number` into `out/stage-N/`.
pub async fn build_mix(
    catalog: &Catalog,
    recipe: &Recipe,
    stage_number: usize,
    out: &Path,
) -> Result<MixMeta> {
    let problems = recipe.check();
    if !problems.is_empty() {
        return Err(Error::Recipe(format!(
            "the recipe has problems (run `lvpipe plan`):\n  {}",
            problems.join("\n  ")
        )));
    }
    let stage = recipe.stage(stage_number)?;
    let PlannedStage {
        selection,
        order,
        packs,
        tokens,
    } = plan_stage(catalog, recipe, stage).await?;
    if order.is_empty() {
        return Err(Error::Recipe(format!(
            "stage `{}` selects no samples",
            stage.name
        )));
    }
    let dir = out.join(format!("stage-{stage_number}"));
    fs_err::create_dir_all(&dir)?;
    // mix.json is written last and means "complete": an older one goes first,
    // so an interrupted rebuild never looks finished.
    match fs_err::remove_file(dir.join(MixMeta::FILE_NAME)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    write_ipc(
        &dir.join("samples.arrow"),
        &samples_batches(&selection, &order, &packs)?,
    )?;
    write_ipc(
        &dir.join("packs.arrow"),
        &[packs_batch(stage_number, &packs, stage.context)?],
    )?;
    write_ipc(
        &dir.join("mix_report.arrow"),
        &[report_batch(stage_number, &selection.reports)?],
    )?;
    let manifest = catalog.manifest()?;
    let meta = MixMeta {
        stage: stage_number,
        name: stage.name.clone(),
        context: stage.context,
        seed: stage.seed,
        global_batch: stage.global_batch,
        epochs: stage.epochs,
        steps: stage.steps,
        tokens_per_media: recipe.model.tokens_per_media(),
        order: stage.order,
        image_size: recipe.model.image_size,
        recipe_fingerprint: recipe.fingerprint(),
        shards_build_fingerprint: manifest.build_fingerprint.clone(),
        tokenizer_fingerprint: manifest.tokenizer_fingerprint.clone(),
        samples: order.len() as u64,
        packs: packs.len() as u64,
        tokens,
        padding: packs
            .iter()
            .map(|p| u64::from(stage.context - p.tokens))
            .sum(),
    };
    let json = serde_json::to_string_pretty(&meta).expect("meta serializes") + "\n";
    fs_err::write(dir.join(MixMeta::FILE_NAME), json)?;
    Ok(meta)
}

/// A pack: a run of consecutive instances of the ordered list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pack {
    pub first: usize,
    pub count: usize,
    pub tokens: u32,
}

/// Greedy packing in order: a sample goes into the current pack if it fits,
/// otherwise it starts the next one. Order is kept, so the seeded
/// permutation alone decides which samples share a row.
fn pack(order: &[Unit], context: u32) -> Vec<Pack> {
    let mut packs: Vec<Pack> = Vec::new();
    for (i, unit) in order.iter().enumerate() {
        match packs.last_mut() {
            Some(p) if p.tokens + unit.expanded <= context => {
                p.count += 1;
                p.tokens += unit.expanded;
            }
            _ => packs.push(Pack {
                first: i,
                count: 1,
                tokens: unit.expanded,
            }),
        }
    }
    packs
}

/// Schema of `samples.arrow`.
pub fn samples_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pack_id", DataType::UInt32, false),
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("chunk", DataType::UInt32, false),
        Field::new("num_media", DataType::UInt32, false),
        Field::new("expanded_len", DataType::UInt32, false),
        Field::new(
            "input_ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        ),
        Field::new(
            "loss_mask",
            DataType::List(Arc::new(Field::new("item", DataType::UInt8, false))),
            false,
        ),
        // Encoded images and frames (JPEG, as stored in the shards); the
        // loader decodes them for the batches it is about to hand out.
        Field::new(
            "media",
            DataType::List(Arc::new(Field::new("item", DataType::Binary, false))),
            false,
        ),
    ]))
}

/// Rows written per IPC record batch.
const ROWS_PER_BATCH: usize = 4096;

fn samples_batches(
    selection: &Selection,
    order: &[Unit],
    packs: &[Pack],
) -> Result<Vec<RecordBatch>> {
    let mut pack_of = vec![0u32; order.len()];
    for (id, p) in packs.iter().enumerate() {
        pack_of[p.first..p.first + p.count].fill(id as u32);
    }
    let mut out = Vec::new();
    for (offset, chunk) in order.chunks(ROWS_PER_BATCH).enumerate() {
        let base = offset * ROWS_PER_BATCH;
        let col = |name: &str, u: &Unit| {
            selection.batches[u.batch]
                .column_by_name(name)
                .expect("selected")
                .clone()
        };
        let mut ids = Vec::new();
        let mut masks = Vec::new();
        let mut lens = Vec::with_capacity(chunk.len());
        let mut media_lens = Vec::with_capacity(chunk.len());
        let mut media_bytes: Vec<Vec<u8>> = Vec::new();
        for u in chunk {
            let list = col("input_ids", u);
            let values = list.as_list::<i32>().value(u.row);
            ids.extend_from_slice(
                &values.as_primitive::<UInt32Type>().values()[u.start as usize..u.end as usize],
            );
            let list = col("loss_mask", u);
            let values = list.as_list::<i32>().value(u.row);
            masks.extend_from_slice(
                &values.as_primitive::<UInt8Type>().values()[u.start as usize..u.end as usize],
            );
            lens.push((u.end - u.start) as usize);
            // Chunks of long documents are text-only; a whole sample brings its media.
            let list = col("media", u);
            let items = list.as_list::<i32>().value(u.row);
            let bytes = items
                .as_struct()
                .column_by_name("bytes")
                .expect("media schema")
                .as_binary::<i32>()
                .clone();
            media_lens.push(arrow::array::Array::len(&bytes));
            media_bytes.extend(bytes.iter().map(|b| b.unwrap_or_default().to_vec()));
        }
        let string = |name: &str| -> ArrayRef {
            Arc::new(
                chunk
                    .iter()
                    .map(|u| Some(col(name, u).as_string::<i32>().value(u.row).to_string()))
                    .collect::<StringArray>(),
            )
        };
        let media = |u: &Unit| {
            let b = &selection.batches[u.batch];
            let get = |n: &str| {
                b.column_by_name(n)
                    .expect("selected")
                    .as_primitive::<UInt32Type>()
                    .value(u.row)
            };
            get("num_images") + get("num_frames")
        };
        let item = |t: DataType| Arc::new(Field::new("item", t, false));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                (0..chunk.len()).map(|i| pack_of[base + i]),
            )),
            string("sample_id"),
            string("source"),
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(|u| u.chunk))),
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(media))),
            Arc::new(UInt32Array::from_iter_values(
                chunk.iter().map(|u| u.expanded),
            )),
            Arc::new(ListArray::try_new(
                item(DataType::UInt32),
                OffsetBuffer::from_lengths(lens.iter().copied()),
                Arc::new(UInt32Array::from(ids)),
                None,
            )?),
            Arc::new(ListArray::try_new(
                item(DataType::UInt8),
                OffsetBuffer::from_lengths(lens.iter().copied()),
                Arc::new(UInt8Array::from(masks)),
                None,
            )?),
            Arc::new(ListArray::try_new(
                item(DataType::Binary),
                OffsetBuffer::from_lengths(media_lens),
                Arc::new(BinaryArray::from_iter_values(media_bytes.iter())),
                None,
            )?),
        ];
        out.push(RecordBatch::try_new(samples_schema(), columns)?);
    }
    Ok(out)
}

/// Schema of `packs.arrow`.
pub fn packs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stage", DataType::UInt32, false),
        Field::new("pack_id", DataType::UInt32, false),
        Field::new("first_row", DataType::UInt64, false),
        Field::new("num_samples", DataType::UInt32, false),
        Field::new("tokens", DataType::UInt32, false),
        Field::new("waste", DataType::UInt32, false),
    ]))
}

fn packs_batch(stage: usize, packs: &[Pack], context: u32) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        packs_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|_| stage as u32),
            )),
            Arc::new(UInt32Array::from_iter_values(0..packs.len() as u32)),
            Arc::new(UInt64Array::from_iter_values(
                packs.iter().map(|p| p.first as u64),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| p.count as u32),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| p.tokens),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| context - p.tokens),
            )),
        ],
    )?)
}

fn report_batch(stage: usize, reports: &[SourceReport]) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("stage", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("selected", DataType::UInt64, false),
        Field::new("too_long", DataType::UInt64, false),
        Field::new("target_share", DataType::Float64, false),
        Field::new("realized_share", DataType::Float64, false),
        Field::new("samples", DataType::UInt64, false),
        Field::new("tokens", DataType::UInt64, false),
    ]));
    let u64s = |f: &dyn Fn(&SourceReport) -> u64| {
        Arc::new(UInt64Array::from_iter_values(reports.iter().map(f))) as ArrayRef
    };
    let f64s = |f: &dyn Fn(&SourceReport) -> f64| {
        Arc::new(Float64Array::from_iter_values(reports.iter().map(f))) as ArrayRef
    };
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(
                reports.iter().map(|_| stage as u32),
            )),
            Arc::new(StringArray::from_iter_values(
                reports.iter().map(|r| r.source.as_str()),
            )),
            u64s(&|r| r.selected),
            u64s(&|r| r.too_long),
            f64s(&|r| r.target_share),
            f64s(&|r| r.realized_share),
            u64s(&|r| r.samples),
            u64s(&|r| r.tokens),
        ],
    )?)
}

/// Writes an Arrow IPC file atomically.
fn write_ipc(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(samples_schema);
    let tmp: PathBuf = path.with_extension("arrow.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    let file = writer
        .into_inner()?
        .into_inner()
        .map_err(|e| Error::Io(e.into_error()))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads every batch of a small IPC file (packs, reports) into memory.
pub fn read_ipc(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = fs_err::File::open(path)?;
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(expanded: u32) -> Unit {
        Unit {
            source: 0,
            batch: 0,
            row: 0,
            start: 0,
            end: expanded,
            chunk: 0,
            expanded,
        }
    }

    #[test]
    fn packing_keeps_order_and_never_overflows() {
        let order: Vec<Unit> = [5, 4, 3, 8, 1, 1, 10].into_iter().map(unit).collect();
        let packs = pack(&order, 10);
        let sizes: Vec<(usize, u32)> = packs.iter().map(|p| (p.count, p.tokens)).collect();
        assert_eq!(sizes, [(2, 9), (1, 3), (3, 10), (1, 10)]);
    }
}
