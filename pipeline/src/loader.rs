//! The streaming loader: deterministic, rank-partitioned, resumable batches of packs.
//!
//! A mix's `samples.arrow` is memory-mapped and decoded in place: the token
//! ids and masks of a batch are read from the page cache and copied once,
//! into the batch. The loader's whole state is (epoch, step): epoch `e`
//! visits the packs in a permutation seeded by (seed, e); global step `s` of
//! the epoch takes packs `[s*G, (s+1)*G)` of it, and rank `r` of `W` takes
//! its `G/W` slice. Any world size that divides `G` therefore sees the same
//! global batches, and resuming at any step costs nothing.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::{UInt8Type, UInt32Type, UInt64Type};
use arrow::ipc::convert::fb_to_schema;
use arrow::ipc::reader::{FileDecoder, read_footer_length};
use arrow::ipc::root_as_footer;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::mix::{MixMeta, read_ipc};
use crate::{Error, Result};

/// Where a loader is: a few integers that go into checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub stage: usize,
    /// Global step counted from the start of the stage, across epochs.
    pub step: u64,
}

/// One pack as the trainer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PackData {
    pub pack_id: u32,
    pub sample_ids: Vec<String>,
    pub input_ids: Vec<u32>,
    /// 1 where the loss applies; the first token of every sample is 0, so no
    /// sample learns from the one before it.
    pub loss_mask: Vec<u8>,
    /// Restart at 0 at every sample.
    pub position_ids: Vec<u32>,
    /// Sample boundaries as cumulative offsets (`cu_seqlens`): 0, len0, len0+len1, ...
    pub boundaries: Vec<u32>,
    /// Expanded tokens (media placeholders counted as the projector's tokens).
    pub expanded_tokens: u32,
    /// Images and frames of the pack, in placeholder order.
    pub num_media: u32,
    /// Their pixels, `[num_media, 3, S, S]` row-major, normalized to [-1, 1]
    /// as SigLIP expects ((x / 255 - 0.5) / 0.5); S is the model's image size.
    pub pixels: Vec<f32>,
}

/// This rank's part of one global batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub step: u64,
    pub epoch: u64,
    pub rank: u32,
    pub packs: Vec<PackData>,
}

/// A memory-mapped mix.
pub struct Mix {
    pub meta: MixMeta,
    batches: Vec<RecordBatch>,
    /// Row offset of each IPC batch, for row -> (batch, row) lookups.
    batch_starts: Vec<u64>,
    first_row: Vec<u64>,
    num_samples: Vec<u32>,
}

impl Mix {
    /// Opens `DIR` (a `stage-N` folder written by `mix`).
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        let meta_path = dir.join(MixMeta::FILE_NAME);
        let meta: MixMeta =
            serde_json::from_str(&fs_err::read_to_string(&meta_path)?).map_err(|e| {
                Error::Shards {
                    path: meta_path.clone(),
                    message: e.to_string(),
                }
            })?;
        let samples_path = dir.join("samples.arrow");
        let batches = mmap_ipc(&samples_path)?;
        // `pack` reads columns by position; a file of another layout (an
        // older lvpipe) is refused here instead of being misread there.
        let expected = crate::mix::samples_schema();
        if let Some(b) = batches
            .iter()
            .find(|b| b.schema().fields() != expected.fields())
        {
            return Err(Error::Shards {
                path: samples_path,
                message: format!(
                    "columns {:?} are not the layout this lvpipe writes; rerun `lvpipe mix`",
                    b.schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let mut batch_starts = Vec::with_capacity(batches.len());
        let mut total = 0u64;
        for b in &batches {
            batch_starts.push(total);
            total += b.num_rows() as u64;
        }
        let mut first_row = Vec::new();
        let mut num_samples = Vec::new();
        for b in read_ipc(&dir.join("packs.arrow"))? {
            let first = b
                .column_by_name("first_row")
                .expect("packs schema")
                .as_primitive::<UInt64Type>();
            let count = b
                .column_by_name("num_samples")
                .expect("packs schema")
                .as_primitive::<UInt32Type>();
            first_row.extend(first.values().iter().copied());
            num_samples.extend(count.values().iter().copied());
        }
        Ok(Arc::new(Mix {
            meta,
            batches,
            batch_starts,
            first_row,
            num_samples,
        }))
    }

    pub fn num_packs(&self) -> usize {
        self.first_row.len()
    }

    /// Full global batches per epoch (a last partial batch is left out).
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_packs() as u64 / u64::from(self.meta.global_batch.max(1))
    }

    /// The pack order of an epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.num_packs() as u32).collect();
        let mut rng =
            SmallRng::seed_from_u64(self.meta.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        order
    }

    /// Assembles one pack from the mapped rows, media decoded.
    pub fn pack(&self, pack_id: u32) -> Result<PackData> {
        let first = self.first_row[pack_id as usize];
        let mut data = PackData {
            pack_id,
            sample_ids: Vec::new(),
            input_ids: Vec::new(),
            loss_mask: Vec::new(),
            position_ids: Vec::new(),
            boundaries: vec![0],
            expanded_tokens: 0,
            num_media: 0,
            pixels: Vec::new(),
        };
        let size = self.meta.image_size;
        for row in first..first + u64::from(self.num_samples[pack_id as usize]) {
            let b = self.batch_starts.partition_point(|&s| s <= row) - 1;
            let batch = &self.batches[b];
            let r = (row - self.batch_starts[b]) as usize;
            let ids = batch.column(6).as_list::<i32>().value(r);
            let ids = ids.as_primitive::<UInt32Type>().values();
            let mask = batch.column(7).as_list::<i32>().value(r);
            let mask = mask.as_primitive::<UInt8Type>().values();
            data.sample_ids
                .push(batch.column(1).as_string::<i32>().value(r).to_string());
            data.expanded_tokens += batch.column(5).as_primitive::<UInt32Type>().value(r);
            let start = data.input_ids.len();
            data.input_ids.extend_from_slice(ids);
            data.loss_mask.extend_from_slice(mask);
            if let Some(m) = data.loss_mask.get_mut(start) {
                *m = 0;
            }
            data.position_ids.extend(0..ids.len() as u32);
            data.boundaries.push(data.input_ids.len() as u32);
            let media = batch.column(8).as_list::<i32>().value(r);
            for bytes in media.as_binary::<i32>().iter().flatten() {
                data.pixels.extend(decode_pixels(
                    bytes,
                    size,
                    &data.sample_ids[data.sample_ids.len() - 1],
                )?);
                data.num_media += 1;
            }
        }
        Ok(data)
    }
}

/// One image to normalized CHW pixels at `size` x `size`. Shards hold images
/// that lvpipe itself encoded, so a failure here means a corrupted mix file.
fn decode_pixels(bytes: &[u8], size: u32, sample_id: &str) -> Result<Vec<f32>> {
    let n = (size * size) as usize;
    let rgb = image::load_from_memory(bytes)
        .map_err(|e| Error::Recipe(format!("mix sample {sample_id}: undecodable image: {e}")))?
        .into_rgb8();
    let rgb = if rgb.dimensions() == (size, size) {
        rgb
    } else {
        image::imageops::resize(&rgb, size, size, image::imageops::FilterType::Triangle)
    };
    let mut out = vec![0.0f32; 3 * n];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = f32::from(px.0[c]) / 127.5 - 1.0;
        }
    }
    Ok(out)
}

/// Decodes an IPC file's batches over a memory map, without copying buffers.
fn mmap_ipc(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = fs_err::File::open(path)?;
    // SAFETY: the file is opened read-only and mixes are written once, by
    // rename; a process that rewrites a mix under a running loader would
    // break this, as it would any memory-mapped reader.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(file.file())? };
    let buffer = Buffer::from(bytes::Bytes::from_owner(map));
    let bad = |m: String| Error::Shards {
        path: path.to_path_buf(),
        message: m,
    };
    if buffer.len() < 10 {
        return Err(bad("not an Arrow IPC file".into()));
    }
    let trailer = buffer.len() - 10;
    let footer_len = read_footer_length(buffer[trailer..].try_into().expect("10 bytes"))?;
    let footer =
        root_as_footer(&buffer[trailer - footer_len..trailer]).map_err(|e| bad(e.to_string()))?;
    let schema = fb_to_schema(footer.schema().ok_or_else(|| bad("no schema".into()))?);
    let decoder = FileDecoder::new(Arc::new(schema), footer.version());
    let mut batches = Vec::new();
    for block in footer.recordBatches().iter().flatten() {
        let len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let data = buffer.slice_with_length(block.offset() as usize, len);
        if let Some(batch) = decoder.read_record_batch(block, &data)? {
            batches.push(batch);
        }
    }
    Ok(batches)
}

/// Batches for one rank of a data-parallel job.
pub struct Loader {
    mix: Arc<Mix>,
    rank: u32,
    world_size: u32,
}

impl Loader {
    pub fn new(mix: Arc<Mix>, rank: u32, world_size: u32) -> Result<Self> {
        let g = mix.meta.global_batch;
        if world_size == 0 || rank >= world_size || g % world_size != 0 {
            return Err(Error::Recipe(format!(
                "rank {rank} of world size {world_size}: the world size must divide the global batch {g}"
            )));
        }
        if mix.steps_per_epoch() == 0 {
            return Err(Error::Recipe(format!(
                "the mix has {} packs, fewer than one global batch of {g}",
                mix.num_packs()
            )));
        }
        Ok(Loader {
            mix,
            rank,
            world_size,
        })
    }

    pub fn mix(&self) -> &Mix {
        &self.mix
    }

    /// This rank's batch at global step `step` (O(packs) for the epoch order,
    /// nothing for the steps before it).
    pub fn batch(&self, step: u64) -> Result<Batch> {
        let spe = self.mix.steps_per_epoch();
        let (epoch, local) = (step / spe, step % spe);
        let order = self.mix.epoch_order(epoch);
        self.batch_in(&order, step, epoch, local)
    }

    fn batch_in(&self, order: &[u32], step: u64, epoch: u64, local: u64) -> Result<Batch> {
        let g = u64::from(self.mix.meta.global_batch);
        let per_rank = g / u64::from(self.world_size);
        let start = (local * g + u64::from(self.rank) * per_rank) as usize;
        // Packs are assembled (and their media decoded) in parallel; on the
        // stream's worker thread this overlaps with the consumer's step.
        let packs = order[start..start + per_rank as usize]
            .par_iter()
            .map(|&p| self.mix.pack(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch {
            step,
            epoch,
            rank: self.rank,
            packs,
        })
    }

    /// Batches from `from_step` on, assembled on a worker thread with at
    /// most `prefetch` batches waiting; the stream ends after an error.
    pub fn stream(
        self,
        from_step: u64,
        steps: u64,
        prefetch: usize,
    ) -> crossbeam_channel::Receiver<Result<Batch>> {
        let (tx, rx) = crossbeam_channel::bounded(prefetch.max(1));
        std::thread::spawn(move || {
            let spe = self.mix.steps_per_epoch();
            let mut cached: Option<(u64, Vec<u32>)> = None;
            for step in from_step..from_step.saturating_add(steps) {
                let (epoch, local) = (step / spe, step % spe);
                if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    cached = Some((epoch, self.mix.epoch_order(epoch)));
                }
                let order = &cached.as_ref().expect("set above").1;
                let batch = self.batch_in(order, step, epoch, local);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}
