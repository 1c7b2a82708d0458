//! Loader throughput over a token-only mix, next to this machine's memcpy.
//!
//! `cargo bench -p lvpipe-pipeline --bench loader [-- GIB]`
//!
//! Writes a mix of GIB (default 1) GiB of token ids (u32) in 4096-token
//! samples packed two per 8192-token pack to `target/bench-loader`, then
//! times one epoch through `Loader::stream` (world size 1, global batch 8:
//! every token id and mask byte is read from the memory map and copied once
//! into its pack) and a plain `memcpy` of the same number of bytes. Best of 3;
//! the first pass also warms the page cache.

// A benchmark reports its measurements on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, ListArray, RecordBatch, StringArray, UInt8Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use lvpipe_pipeline::{Loader, Mix, MixMeta};

const SAMPLE_TOKENS: usize = 4096;
const PER_PACK: usize = 2;
const ROWS_PER_BATCH: usize = 1024;

fn write(path: &Path, batches: impl Iterator<Item = RecordBatch>, schema: Arc<Schema>) {
    let file = std::fs::File::create(path).unwrap();
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema).unwrap();
    for b in batches {
        w.write(&b).unwrap();
    }
    w.finish().unwrap();
}

fn prepare(dir: &Path, gib: f64) -> u64 {
    let samples =
        ((gib * (1u64 << 30) as f64) / (SAMPLE_TOKENS * 4) as f64) as usize / PER_PACK * PER_PACK;
    let packs = samples / PER_PACK;
    let meta_path = dir.join(MixMeta::FILE_NAME);
    if meta_path.exists() {
        let meta: MixMeta =
            serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
        if meta.samples == samples as u64 {
            return meta.tokens;
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let schema = lvpipe_schemas::mix_samples_schema();
    let item = |t: DataType| Arc::new(Field::new("item", t, false));
    let batches = (0..samples).step_by(ROWS_PER_BATCH).map(|start| {
        let n = ROWS_PER_BATCH.min(samples - start);
        let lens = vec![SAMPLE_TOKENS; n];
        let ids: Vec<u32> = (0..n * SAMPLE_TOKENS)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) % 151_000)
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                (start..start + n).map(|r| (r / PER_PACK) as u32),
            )),
            Arc::new(StringArray::from_iter_values(
                (start..start + n).map(|r| format!("{r:032x}")),
            )),
            Arc::new(StringArray::from_iter_values((0..n).map(|_| "bench"))),
            Arc::new(UInt32Array::from(vec![0; n])),
            Arc::new(UInt32Array::from(vec![0; n])),
            Arc::new(UInt32Array::from(vec![SAMPLE_TOKENS as u32; n])),
            Arc::new(ListArray::new(
                item(DataType::UInt32),
                OffsetBuffer::from_lengths(lens.clone()),
                Arc::new(UInt32Array::from(ids)),
                None,
            )),
            Arc::new(ListArray::new(
                item(DataType::UInt8),
                OffsetBuffer::from_lengths(lens),
                Arc::new(UInt8Array::from(vec![1u8; n * SAMPLE_TOKENS])),
                None,
            )),
            Arc::new(ListArray::new(
                item(DataType::Binary),
                OffsetBuffer::from_lengths(vec![0; n]),
                Arc::new(arrow::array::BinaryArray::from(Vec::<&[u8]>::new())),
                None,
            )),
        ];
        RecordBatch::try_new(schema.clone(), columns).unwrap()
    });
    write(&dir.join("samples.arrow"), batches, schema.clone());
    let packs_schema = lvpipe_schemas::packs_schema();
    let context = (SAMPLE_TOKENS * PER_PACK) as u32;
    let packs_batch = RecordBatch::try_new(
        packs_schema.clone(),
        vec![
            Arc::new(UInt32Array::from(vec![1; packs])),
            Arc::new(UInt32Array::from_iter_values(0..packs as u32)),
            Arc::new(UInt64Array::from_iter_values(
                (0..packs as u64).map(|p| p * PER_PACK as u64),
            )),
            Arc::new(UInt32Array::from(vec![PER_PACK as u32; packs])),
            Arc::new(UInt32Array::from(vec![context; packs])),
            Arc::new(UInt32Array::from(vec![0; packs])),
        ],
    )
    .unwrap();
    write(
        &dir.join("packs.arrow"),
        std::iter::once(packs_batch),
        packs_schema,
    );
    let tokens = (samples * SAMPLE_TOKENS) as u64;
    let meta = MixMeta {
        stage: 1,
        name: "bench".into(),
        context,
        seed: 1,
        global_batch: 8,
        epochs: Some(1),
        steps: None,
        tokens_per_media: 1,
        order: Default::default(),
        image_size: 64,
        recipe_fingerprint: String::new(),
        shards_build_fingerprint: String::new(),
        tokenizer_fingerprint: String::new(),
        samples: samples as u64,
        packs: packs as u64,
        tokens,
        padding: 0,
        files: Vec::new(),
    };
    std::fs::write(meta_path, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    tokens
}

fn main() {
    let gib: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1.0);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-loader");
    let tokens = prepare(&dir, gib);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{{\"loadavg\": \"{}\", \"tokens\": {tokens}, \"token_bytes\": {}}}",
        loadavg.trim(),
        tokens * 4
    );

    let mut best = f64::MAX;
    for _ in 0..3 {
        let mix = Mix::open(&dir).unwrap();
        let steps = mix.steps_per_epoch();
        let t = Instant::now();
        let mut seen = 0u64;
        for batch in Loader::new(mix, 0, 1).unwrap().stream(0, steps, 4) {
            let batch = batch.unwrap();
            seen += batch
                .packs
                .iter()
                .map(|p| p.input_ids.len() as u64)
                .sum::<u64>();
        }
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(seen, tokens);
    }
    // Per token the loader moves 4 bytes of id and 1 of mask (and writes 4 of position).
    println!(
        "{{\"bench\": \"loader epoch (mmap, world 1, prefetch 4)\", \"seconds\": {best:.3}, \"tokens_per_s\": {:.3e}, \"id_gb_per_s\": {:.2}, \"id_mask_gb_per_s\": {:.2}}}",
        tokens as f64 / best,
        tokens as f64 * 4.0 / best / 1e9,
        tokens as f64 * 5.0 / best / 1e9
    );

    let bytes = (tokens * 4) as usize;
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    println!(
        "{{\"bench\": \"memcpy, 1 thread\", \"bytes\": {bytes}, \"gb_per_s\": {:.2}}}",
        bytes as f64 / best / 1e9
    );
}
