//! The streaming loader: deterministic, rank-partitioned, resumable batches of packs.
//!
//! A mix's `samples.arrow` is memory-mapped and decoded in place: the token
//! ids and masks of a batch are read from the page cache and copied once,
//! into the batch. The loader's whole state is (epoch, step): epoch `e`
//! visits the packs in a permutation seeded by (seed, e) (a `sequential`
//! stage's in the mix's own order); global step `s` of
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
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use lvpipe_sharding::media::decode_pixels;

mod ipc;

use ipc::MappedIpc;

use crate::mix::MixMeta;
use crate::recipe::Order;
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
    /// The shard source each sample came from (`samples.source`).
    pub sources: Vec<String>,
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
    samples: MappedIpc,
    packs: MappedIpc,
    permutation: Permutation,
}

/// A seeded bijection of [0, n) per epoch: a four-round Feistel network
/// over the next even power of two, cycle-walked back into range. Any
/// position maps to its pack in O(1) without building the order.
struct Permutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl Permutation {
    fn new(n: u64, key: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        Permutation {
            n,
            half_bits: bits.div_ceil(2),
            key,
        }
    }

    fn apply(&self, epoch: u64, position: u64) -> u64 {
        debug_assert!(position < self.n);
        let mask = (1u64 << self.half_bits) - 1;
        let round_keys: [u64; 4] = std::array::from_fn(|i| {
            splitmix(
                self.key
                    ^ splitmix(
                        epoch.wrapping_add(0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(i as u64 + 1)),
                    ),
            )
        });
        let mut x = position;
        loop {
            let (mut l, mut r) = (x >> self.half_bits, x & mask);
            for k in round_keys {
                (l, r) = (r, l ^ (splitmix(r ^ k) & mask));
            }
            x = (l << self.half_bits) | r;
            // The domain is under 4n: a few steps at most on average.
            if x < self.n {
                return x;
            }
        }
    }
}

/// SplitMix64's output function of `z + golden ratio`: the seeded hash
/// every seeded choice of lvpipe derives from (epoch orders, fresh weights,
/// evaluation needles).
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Mix {
    /// Opens `DIR` (a `stage-N` folder written by `mix`).
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        let meta_path = dir.join(MixMeta::FILE_NAME);
        let meta: MixMeta =
            serde_json::from_str(&fs_err::read_to_string(&meta_path)?).map_err(|e| {
                Error::Folder {
                    path: meta_path.clone(),
                    message: e.to_string(),
                }
            })?;
        let samples_path = dir.join("samples.arrow");
        let samples = MappedIpc::open(&samples_path)?;
        // `pack` reads columns by position; a file of another layout (an
        // older lvpipe) is refused here instead of being misread there.
        let expected = lvpipe_schemas::mix_samples_schema();
        if samples.schema.fields() != expected.fields() {
            return Err(Error::Folder {
                path: samples_path,
                message: format!(
                    "columns {:?} are not the layout this lvpipe writes; rerun `lvpipe mix`",
                    samples
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let packs = MappedIpc::open(&dir.join("packs.arrow"))?;
        for name in ["pack_id", "first_row", "num_samples"] {
            if packs.schema.index_of(name).is_err() {
                return Err(Error::Folder {
                    path: packs.path.clone(),
                    message: format!("no `{name}` column; rerun `lvpipe mix`"),
                });
            }
        }
        let key = meta.seed;
        Ok(Arc::new(Mix {
            meta,
            samples,
            permutation: Permutation::new(packs.rows, key),
            packs,
        }))
    }

    pub fn num_packs(&self) -> usize {
        self.packs.rows as usize
    }

    /// Full global batches per epoch (a last partial batch is left out).
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_packs() as u64 / u64::from(self.meta.global_batch.max(1))
    }

    /// The pack at `position` of epoch `epoch`'s order: O(1), nothing is
    /// materialized, so the first batch of a mix of a million packs comes as
    /// fast as of a thousand. A `sequential` stage's packs come in the mix's
    /// order in every epoch.
    pub fn pack_at(&self, epoch: u64, position: u64) -> u32 {
        match self.meta.order {
            Order::Sequential => position as u32,
            Order::Shuffled => self.permutation.apply(epoch, position) as u32,
        }
    }

    /// Where pack `pack_id`'s samples are: (first row, count).
    fn pack_rows(&self, pack_id: u32) -> Result<(u64, u32)> {
        let (batch, r) = self.packs.row(u64::from(pack_id))?;
        let column = |name: &str| batch.column_by_name(name).expect("checked at open");
        let id = column("pack_id").as_primitive::<UInt32Type>().value(r);
        if id != pack_id {
            return Err(Error::Folder {
                path: self.packs.path.clone(),
                message: format!("row {pack_id} holds pack {id}: packs must be in pack_id order"),
            });
        }
        Ok((
            column("first_row").as_primitive::<UInt64Type>().value(r),
            column("num_samples").as_primitive::<UInt32Type>().value(r),
        ))
    }

    /// Who is in pack `pack_id`, without copying tokens or media:
    /// (sample id, source, chunk, token ids) per sample.
    pub fn pack_members(&self, pack_id: u32) -> Result<Vec<(String, String, u32, u32)>> {
        let (first, count) = self.pack_rows(pack_id)?;
        (first..first + u64::from(count))
            .map(|row| {
                let (batch, r) = self.samples.row(row)?;
                Ok((
                    batch.column(1).as_string::<i32>().value(r).to_string(),
                    batch.column(2).as_string::<i32>().value(r).to_string(),
                    batch.column(3).as_primitive::<UInt32Type>().value(r),
                    batch.column(6).as_list::<i32>().value(r).len() as u32,
                ))
            })
            .collect()
    }

    /// Assembles one pack from the mapped rows, media decoded.
    pub fn pack(&self, pack_id: u32) -> Result<PackData> {
        let (mut data, media) = self.assemble(pack_id)?;
        for m in &media {
            data.pixels
                .extend(m.decode(self.meta.image_size, &data.sample_ids)?);
        }
        Ok(data)
    }

    /// One pack's tokens, copied from the mapped rows, and its media still
    /// encoded (decoded by the caller, in parallel across a batch).
    fn assemble(&self, pack_id: u32) -> Result<(PackData, Vec<EncodedMedia>)> {
        let (first, count) = self.pack_rows(pack_id)?;
        let mut data = PackData {
            pack_id,
            sample_ids: Vec::with_capacity(count as usize),
            sources: Vec::with_capacity(count as usize),
            input_ids: Vec::new(),
            loss_mask: Vec::new(),
            position_ids: Vec::new(),
            boundaries: vec![0],
            expanded_tokens: 0,
            num_media: 0,
            pixels: Vec::new(),
        };
        let mut media = Vec::new();
        for row in first..first + u64::from(count) {
            let (batch, r) = self.samples.row(row)?;
            let ids = batch.column(6).as_list::<i32>().value(r);
            let ids = ids.as_primitive::<UInt32Type>().values();
            let mask = batch.column(7).as_list::<i32>().value(r);
            let mask = mask.as_primitive::<UInt8Type>().values();
            data.sample_ids
                .push(batch.column(1).as_string::<i32>().value(r).to_string());
            data.sources
                .push(batch.column(2).as_string::<i32>().value(r).to_string());
            data.expanded_tokens += batch.column(5).as_primitive::<UInt32Type>().value(r);
            let start = data.input_ids.len();
            data.input_ids.extend_from_slice(ids);
            data.loss_mask.extend_from_slice(mask);
            if let Some(m) = data.loss_mask.get_mut(start) {
                *m = 0;
            }
            data.position_ids.extend(0..ids.len() as u32);
            data.boundaries.push(data.input_ids.len() as u32);
            let items = batch.column(8).as_list::<i32>().value(r);
            for index in 0..items.len() {
                media.push(EncodedMedia {
                    items: items.clone(),
                    index,
                    sample: data.sample_ids.len() - 1,
                });
            }
            data.num_media += items.len() as u32;
        }
        Ok((data, media))
    }
}

/// An image or frame of a pack, still JPEG, in the mapped file.
struct EncodedMedia {
    items: arrow::array::ArrayRef,
    index: usize,
    /// Which sample of the pack it belongs to (for error messages).
    sample: usize,
}

impl EncodedMedia {
    fn decode(&self, size: u32, sample_ids: &[String]) -> Result<Vec<f32>> {
        let bytes = self.items.as_binary::<i32>().value(self.index);
        // Shards hold images that lvpipe itself encoded, so a failure here
        // means a corrupted mix file.
        decode_pixels(bytes, size).map_err(|message| Error::CorruptMix {
            sample: sample_ids[self.sample].clone(),
            message,
        })
    }
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
        if world_size == 0 || rank >= world_size || !g.is_multiple_of(world_size) {
            return Err(Error::Usage(format!(
                "rank {rank} of world size {world_size}: the world size must divide the global batch {g}"
            )));
        }
        if mix.steps_per_epoch() == 0 {
            return Err(Error::Usage(format!(
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

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// This rank's batch at global step `step` (O(packs) for the epoch order,
    /// nothing for the steps before it).
    pub fn batch(&self, step: u64) -> Result<Batch> {
        let (epoch, positions) = self.positions(step);
        let per_rank = positions.end - positions.start;
        // Packs are assembled (and their media decoded) in parallel; on the
        // stream's worker thread this overlaps with the consumer's step.
        // Tokens are copied in parallel when the batch is big enough to pay
        // for waking the pool (a single core does not saturate memory
        // bandwidth), pack by pack otherwise; the media of the whole batch
        // then decode in parallel.
        let assemble = |i: u64| self.mix.assemble(self.mix.pack_at(epoch, i));
        let parts = if per_rank * u64::from(self.mix.meta.context) >= 1 << 16 {
            positions
                .into_par_iter()
                .map(assemble)
                .collect::<Result<Vec<_>>>()?
        } else {
            positions.map(assemble).collect::<Result<Vec<_>>>()?
        };
        let jobs: Vec<(usize, &EncodedMedia)> = parts
            .iter()
            .enumerate()
            .flat_map(|(p, (_, media))| media.iter().map(move |m| (p, m)))
            .collect();
        let size = self.mix.meta.image_size;
        let pixels = jobs
            .par_iter()
            .map(|(p, m)| m.decode(size, &parts[*p].0.sample_ids))
            .collect::<Result<Vec<_>>>()?;
        let owners: Vec<usize> = jobs.iter().map(|(p, _)| *p).collect();
        drop(jobs);
        let mut packs: Vec<PackData> = parts.into_iter().map(|(data, _)| data).collect();
        for (p, px) in owners.into_iter().zip(pixels) {
            packs[p].pixels.extend(px);
        }
        Ok(Batch {
            step,
            epoch,
            rank: self.rank,
            packs,
        })
    }

    /// The epoch of global step `step` and this rank's positions in that
    /// epoch's pack order.
    fn positions(&self, step: u64) -> (u64, std::ops::Range<u64>) {
        let spe = self.mix.steps_per_epoch();
        let (epoch, local) = (step / spe, step % spe);
        let g = u64::from(self.mix.meta.global_batch);
        let per_rank = g / u64::from(self.world_size);
        let start = local * g + u64::from(self.rank) * per_rank;
        (epoch, start..start + per_rank)
    }

    /// The packs of this rank's batch at `step`, without assembling them
    /// (lineage, replay): (epoch, pack ids).
    pub fn pack_ids(&self, step: u64) -> (u64, Vec<u32>) {
        let (epoch, positions) = self.positions(step);
        (
            epoch,
            positions.map(|i| self.mix.pack_at(epoch, i)).collect(),
        )
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
            for step in from_step..from_step.saturating_add(steps) {
                let batch = self.batch(step);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_bijections_that_change_per_epoch() {
        for n in [1u64, 2, 3, 7, 1000, 1025, 4096] {
            let p = Permutation::new(n, 42);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(0, i)).collect();
            let first = seen.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
            if n >= 7 {
                let other: Vec<u64> = (0..n).map(|i| p.apply(1, i)).collect();
                assert_ne!(first, other, "epochs 0 and 1 of n = {n}");
                let seeded: Vec<u64> = (0..n)
                    .map(|i| Permutation::new(n, 43).apply(0, i))
                    .collect();
                assert_ne!(first, seeded, "seeds 42 and 43 of n = {n}");
            }
        }
    }
}
