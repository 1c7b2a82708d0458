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

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::UInt32Type;
use futures::StreamExt;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use lvpipe_sharding::storage::{Location, Remote};

use crate::catalog::Catalog;
use crate::recipe::{LongSamples, Order, Recipe, Stage, WeightBy};
use crate::{Error, Result};

mod files;

pub(crate) use files::Spool;
pub use files::read_ipc;
use files::{Spooled, packs_batch, report_batch, write_ipc, write_samples};

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
    /// Size and blake3 of each file of the mix: a copy fetched from object
    /// storage is checked against them.
    #[serde(default)]
    pub files: Vec<MixFile>,
}

/// One file of a mix, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixFile {
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
}

impl MixMeta {
    pub const FILE_NAME: &'static str = "mix.json";
    /// The files of a mix besides `mix.json`, which is written last.
    pub const FILES: [&'static str; 3] = ["samples.arrow", "packs.arrow", "mix_report.arrow"];

    /// The data a mix was made of: its shards' build and their tokenizer. A
    /// trained stage records it; a chain retrains a stage whose data changed.
    pub fn data_fingerprint(&self) -> String {
        format!(
            "{}/{}",
            self.shards_build_fingerprint, self.tokenizer_fingerprint
        )
    }
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

/// One selected sample: what ordering and packing need, and where its
/// tokens and media wait in the spool (only `mix` spools them; `plan` does
/// not need them).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    sample_id: String,
    /// Index into [`Selection::shard_sources`].
    shard_source: u32,
    tokens: u32,
    media: u32,
    spooled: Spooled,
}

/// Where each sample instance comes from: its row and the token range (a
/// chunk of a long document, or the whole sample).
#[derive(Debug, Clone, Copy)]
struct Unit {
    source: u32,
    row: u32,
    start: u32,
    end: u32,
    chunk: u32,
    expanded: u32,
}

/// The selected samples of one stage and the units cut from them. Only
/// their metadata is held: a stage's tokens and media stream from the shards
/// into the spool and from the spool into the mix file.
pub(crate) struct Selection {
    rows: Vec<Row>,
    /// The shards' `source` names of the selected rows, each once.
    shard_sources: Vec<String>,
    units: Vec<Vec<Unit>>,
    pub reports: Vec<SourceReport>,
}

/// What `mix` reads of each selected sample; `plan` reads only the first six.
const SELECT_COLUMNS: &str =
    "sample_id, source, kind, num_images, num_frames, input_ids, loss_mask, media";
const PLAN_COLUMNS: &str = "sample_id, source, kind, num_images, num_frames, input_ids";

/// Runs each source's query as a stream of record batches and cuts its rows
/// into units that fit the context. With a spool, each kept row's tokens,
/// mask and media are appended to it as the batches arrive, so no more than
/// DataFusion's batches in flight are ever held.
pub(crate) async fn select(
    catalog: &Catalog,
    recipe: &Recipe,
    stage: &Stage,
    mut spool: Option<&mut Spool>,
) -> Result<Selection> {
    let tpm = recipe.model.tokens_per_media();
    let columns = match spool {
        Some(_) => SELECT_COLUMNS,
        None => PLAN_COLUMNS,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut shard_sources: Vec<String> = Vec::new();
    let mut units = Vec::new();
    let mut reports = Vec::new();
    for (index, source) in stage.sources.iter().enumerate() {
        let query_err = |e: Error| {
            Error::Recipe(format!(
                "stage `{}`, source `{}`: {e}",
                stage.name, source.name
            ))
        };
        let mut stream = catalog
            .stream(&source.sql(columns))
            .await
            .map_err(query_err)?;
        let first = rows.len();
        let (mut selected, mut too_long) = (0u64, 0u64);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| query_err(e.into()))?;
            let column = |name: &str| batch.column_by_name(name).expect("selected");
            let ids = column("input_ids").as_list::<i32>();
            let kinds = column("kind").as_string::<i32>();
            let names = column("source").as_string::<i32>();
            let sample_ids = column("sample_id").as_string::<i32>();
            let imgs = column("num_images").as_primitive::<UInt32Type>();
            let frames = column("num_frames").as_primitive::<UInt32Type>();
            for row in 0..batch.num_rows() {
                selected += 1;
                let tokens = ids.value_length(row) as u32;
                let media = imgs.value(row) + frames.value(row);
                let expanded = tokens + media * tpm.saturating_sub(1);
                let chunkable = stage.long_samples == LongSamples::Chunk
                    && media == 0
                    && kinds.value(row) == "text";
                if expanded > stage.context && !chunkable {
                    too_long += 1;
                    continue;
                }
                let name = names.value(row);
                let shard_source = match shard_sources.iter().position(|s| s == name) {
                    Some(i) => i,
                    None => {
                        shard_sources.push(name.to_string());
                        shard_sources.len() - 1
                    }
                } as u32;
                let spooled = match spool.as_deref_mut() {
                    Some(spool) => spool.append(&batch, row)?,
                    None => Spooled::default(),
                };
                rows.push(Row {
                    sample_id: sample_ids.value(row).to_string(),
                    shard_source,
                    tokens,
                    media,
                    spooled,
                });
            }
        }
        // A stable base order, whatever order the files were scanned in.
        rows[first..].sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
        let mut these = Vec::new();
        for (i, row) in rows.iter().enumerate().skip(first) {
            let expanded = row.tokens + row.media * tpm.saturating_sub(1);
            let unit = |start: u32, end: u32, chunk: u32, expanded: u32| Unit {
                source: index as u32,
                row: i as u32,
                start,
                end,
                chunk,
                expanded,
            };
            if expanded <= stage.context {
                these.push(unit(0, row.tokens, 0, expanded));
            } else {
                // A long text-only sample: context-sized chunks.
                let mut start = 0;
                let mut chunk = 0;
                while start < row.tokens {
                    let end = (start + stage.context).min(row.tokens);
                    these.push(unit(start, end, chunk, end - start));
                    start = end;
                    chunk += 1;
                }
            }
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
        rows,
        shard_sources,
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

/// Everything `mix` decides, without writing: `plan` reports it. With a
/// spool, the selected samples' tokens and media are copied into it too.
pub(crate) async fn plan_stage(
    catalog: &Catalog,
    recipe: &Recipe,
    stage: &Stage,
    spool: Option<&mut Spool>,
) -> Result<PlannedStage> {
    let mut selection = select(catalog, recipe, stage, spool).await?;
    let mut rng = SmallRng::seed_from_u64(stage.seed);
    let mut order = instances(stage, &mut selection, &mut rng);
    order.shuffle(&mut rng);
    if stage.order == Order::Sequential {
        // Stable: each part keeps its shuffled order.
        order.sort_by_key(|u| stage.sources[u.source as usize].part(u.source as usize));
    }
    let packs = pack(&order, stage.context);
    let tokens: u64 = order.iter().map(|u| u64::from(u.expanded)).sum();
    for unit in &order {
        let r = &mut selection.reports[unit.source as usize];
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
    let dir = out.join(format!("stage-{stage_number}"));
    fs_err::create_dir_all(&dir)?;
    let _lock = lvpipe_schemas::FolderLock::acquire(&dir, "mix")?;
    // mix.json is written last and means "complete": an older one goes first,
    // so an interrupted rebuild never looks finished.
    match fs_err::remove_file(dir.join(MixMeta::FILE_NAME)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    // The selected samples' tokens and media wait on disk, beside the mix,
    // in an unnamed file the system deletes when it is closed.
    let mut spool = Spool::new(&dir)?;
    let PlannedStage {
        selection,
        order,
        packs,
        tokens,
    } = plan_stage(catalog, recipe, stage, Some(&mut spool)).await?;
    if order.is_empty() {
        return Err(Error::Recipe(format!(
            "stage `{}` selects no samples",
            stage.name
        )));
    }
    // A mix's output must be trustworthy: the shards are checked against
    // their recorded checksums first.
    catalog.verify()?;
    write_samples(
        &dir.join("samples.arrow"),
        &selection,
        &order,
        &packs,
        &spool.finish()?,
        files::BYTES_PER_BATCH,
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
        files: MixMeta::FILES
            .iter()
            .map(|file| {
                let mut f = fs_err::File::open(dir.join(file))?;
                Ok(MixFile {
                    file: file.to_string(),
                    bytes: f.metadata()?.len(),
                    blake3: lvpipe_sharding::verify::blake3_of(&mut f, &|_| {})?,
                })
            })
            .collect::<Result<_>>()?,
    };
    let json = serde_json::to_string_pretty(&meta).expect("meta serializes") + "\n";
    fs_err::write(dir.join(MixMeta::FILE_NAME), json)?;
    Ok(meta)
}

/// Publishes a stage's mix folder to object storage, `mix.json` last.
pub async fn publish_mix(local: &Path, remote: &Remote) -> Result<()> {
    let files: Vec<String> = MixMeta::FILES.iter().map(|f| f.to_string()).collect();
    Ok(remote.publish(local, &files, MixMeta::FILE_NAME).await?)
}

/// Fetches a stage's mix from object storage into a folder of `cache`
/// named after its URL, unless the same mix is there already, and returns
/// that folder. Each file is checked against the size and blake3 that
/// `mix.json` records; the ranks of a machine share the cache (one fetches,
/// the others wait for it). With `limit`, the cache's mixes stay within
/// that many bytes: the least recently used other mixes are removed to
/// make room ([`make_room`]).
pub async fn fetch_mix(
    remote: &Remote,
    cache: &Path,
    limit: Option<u64>,
) -> Result<std::path::PathBuf> {
    let folder = Location::Remote(remote.clone());
    let local = lvpipe_sharding::storage::local_folder(&folder, cache);
    let _lock = lvpipe_schemas::FolderLock::wait(&local)?;
    let text = remote
        .read(MixMeta::FILE_NAME)
        .await?
        .ok_or_else(|| Error::Folder {
            path: remote.url().into(),
            message: format!(
                "no {} here: not a mix, or its upload did not finish (run `lvpipe mix` again)",
                MixMeta::FILE_NAME
            ),
        })?;
    let meta: MixMeta = serde_json::from_slice(&text).map_err(|e| Error::Folder {
        path: remote.file_url(MixMeta::FILE_NAME).into(),
        message: e.to_string(),
    })?;
    if meta.files.is_empty() {
        return Err(Error::Folder {
            path: remote.url().into(),
            message:
                "this mix records no checksums (an older lvpipe made it): run `lvpipe mix` again"
                    .into(),
        });
    }
    let current = fs_err::read(local.join(MixMeta::FILE_NAME)).ok();
    if current.as_deref() != Some(&text[..]) {
        // Another mix was here: it must not look complete while this one arrives.
        match fs_err::remove_file(local.join(MixMeta::FILE_NAME)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        if let Some(limit) = limit {
            let need = meta.files.iter().map(|f| f.bytes).sum::<u64>() + text.len() as u64;
            make_room(cache, &local, need, limit)?;
        }
        let files: Vec<(String, u64, Option<String>)> = meta
            .files
            .iter()
            .map(|f| (f.file.clone(), f.bytes, Some(f.blake3.clone())))
            .collect();
        remote.fetch(&local, &files, MixMeta::FILE_NAME).await?;
    }
    // Its last use, for the eviction order.
    fs_err::write(local.join(LAST_USED), b"")?;
    Ok(local)
}

/// Touched each time a cached mix is used.
const LAST_USED: &str = ".last-used";

/// Removes the least recently used mix folders of `cache` other than `keep`
/// until `need` more bytes fit within `limit`. A folder another process is
/// filling (its lock held) is left alone; a process still reading a removed
/// mix keeps its mapped files (the system frees them when it closes them).
fn make_room(cache: &Path, keep: &Path, need: u64, limit: u64) -> Result<()> {
    if need > limit {
        return Err(Error::Usage(format!(
            "the mix is {need} bytes, more than the cache's limit of {limit}: raise --cache-size"
        )));
    }
    let size = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    };
    let mut others: Vec<(std::time::SystemTime, std::path::PathBuf, u64)> =
        std::fs::read_dir(cache)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p != keep)
            .map(|p| {
                let used = std::fs::metadata(p.join(LAST_USED))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let bytes = size(&p);
                (used, p, bytes)
            })
            .collect();
    others.sort();
    // The mix in `keep`, if any, is replaced file by file: `need` counts it.
    let mut total: u64 = others.iter().map(|o| o.2).sum();
    for (_, dir, bytes) in others {
        if total + need <= limit {
            break;
        }
        let Ok(_lock) = lvpipe_schemas::FolderLock::acquire(&dir, "evict") else {
            continue;
        };
        fs_err::remove_dir_all(&dir)?;
        total -= bytes;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(expanded: u32) -> Unit {
        Unit {
            source: 0,
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
