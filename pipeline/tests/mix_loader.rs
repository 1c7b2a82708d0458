//! Properties of mixing, packing and the loader over random small shard sets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Float32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, UInt8Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field};
use lvpipe_pipeline::{Catalog, Loader, Mix, Recipe, build_mix};
use lvpipe_schemas::{
    MEDIA_ITEM_FIELDS, MESSAGE_FIELDS, Manifest, ManifestShard, TableKind, samples_schema,
};
use proptest::prelude::*;

/// A sample of the fake shards: source, text tokens, images.
#[derive(Debug, Clone)]
struct Fake {
    source: &'static str,
    tokens: u32,
    images: u32,
}

fn list(item: DataType, lens: &[usize], values: ArrayRef) -> ArrayRef {
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", item, false)),
        OffsetBuffer::from_lengths(lens.iter().copied()),
        values,
        None,
    ))
}

/// Writes a one-file shard folder holding `samples` (no media bytes: the mix
/// only needs counts) and its manifest.
fn write_shards(dir: &Path, samples: &[Fake]) {
    let n = samples.len();
    let ids: Vec<String> = (0..n).map(|i| format!("{i:032x}")).collect();
    let strs = |f: &dyn Fn(usize) -> String| {
        Arc::new(StringArray::from_iter_values((0..n).map(f))) as ArrayRef
    };
    let u32s = |f: &dyn Fn(&Fake) -> u32| {
        Arc::new(UInt32Array::from_iter_values(samples.iter().map(f))) as ArrayRef
    };
    let token_lens: Vec<usize> = samples.iter().map(|s| s.tokens as usize).collect();
    let total: usize = token_lens.iter().sum();
    // Token i of sample k is k * 1000 + i, so tests can tell samples apart.
    let tokens: Vec<u32> = samples
        .iter()
        .enumerate()
        .flat_map(|(k, s)| (0..s.tokens).map(move |i| k as u32 * 1000 + i))
        .collect();
    let msg_values = StructArray::try_new(
        MESSAGE_FIELDS.clone(),
        vec![
            Arc::new(StringArray::from(Vec::<&str>::new())),
            Arc::new(StringArray::from(Vec::<&str>::new())),
        ],
        None,
    )
    .unwrap();
    let media_values = StructArray::try_new(
        MEDIA_ITEM_FIELDS.clone(),
        vec![
            Arc::new(BinaryArray::from(Vec::<&[u8]>::new())),
            Arc::new(StringArray::from(Vec::<&str>::new())),
            Arc::new(UInt32Array::from(Vec::<u32>::new())),
            Arc::new(UInt32Array::from(Vec::<u32>::new())),
            Arc::new(UInt32Array::from(Vec::<u32>::new())),
            Arc::new(UInt32Array::from(Vec::<u32>::new())),
            Arc::new(UInt32Array::from(Vec::<u32>::new())),
            Arc::new(Int64Array::from(Vec::<i64>::new())),
        ],
        None,
    )
    .unwrap();
    let zeros = vec![0usize; n];
    let nulls = |t: DataType| arrow::array::new_null_array(&t, n);
    let columns: Vec<ArrayRef> = vec![
        strs(&|i| ids[i].clone()),
        strs(&|i| samples[i].source.to_string()),
        strs(&|i| {
            if samples[i].images > 0 {
                "image_text".into()
            } else {
                "text".into()
            }
        }),
        strs(&|i| format!("fake:{i}")),
        nulls(DataType::Utf8),
        strs(&|i| ids[i].clone()),
        list(
            DataType::Struct(MESSAGE_FIELDS.clone()),
            &zeros,
            Arc::new(msg_values),
        ),
        list(
            DataType::Struct(MEDIA_ITEM_FIELDS.clone()),
            &zeros,
            Arc::new(media_values),
        ),
        u32s(&|s| s.images),
        u32s(&|_| 0),
        nulls(DataType::Int64),
        nulls(DataType::Float64),
        nulls(DataType::Utf8),
        list(
            DataType::UInt32,
            &token_lens,
            Arc::new(UInt32Array::from(tokens)),
        ),
        list(
            DataType::UInt8,
            &token_lens,
            Arc::new(UInt8Array::from(vec![1u8; total])),
        ),
        u32s(&|s| s.tokens),
        u32s(&|s| s.tokens),
        u32s(&|_| 2),
        Arc::new(UInt64Array::from(vec![0u64; n])),
        Arc::new(UInt64Array::from(vec![0u64; n])),
        nulls(DataType::UInt32),
        nulls(DataType::UInt32),
        Arc::new(Float32Array::from(vec![None::<f32>; n])),
    ];
    // Media counts without media items break the media invariant (the mix
    // reads only the counts), so the batch is written without validation.
    let batch = RecordBatch::try_new(samples_schema(), columns).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("samples-00000.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        samples_schema(),
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let written = std::fs::read(&path).unwrap();
    let manifest = Manifest {
        schema_version: lvpipe_schemas::SCHEMA_VERSION.into(),
        lvpipe_version: "test".into(),
        tokenizer_fingerprint: "t".into(),
        added_tokens: vec![],
        chat_template: "chatml".into(),
        build_fingerprint: "b".into(),
        build_args: serde_json::json!({}),
        sources: vec![],
        shards: vec![ManifestShard {
            file: "samples-00000.parquet".into(),
            table: TableKind::Samples,
            rows: n as u64,
            bytes: written.len() as u64,
            blake3: blake3::hash(&written).to_hex().to_string(),
            record_start: 0,
            record_end: n as u64,
        }],
    };
    std::fs::write(dir.join(Manifest::FILE_NAME), manifest.to_json()).unwrap();
}

fn recipe(context: u32, global_batch: u32, repeats: (u32, u32), seed: u64) -> Recipe {
    Recipe::parse(&format!(
        r#"
[model]
image_size = 32
patch_size = 8
vision_hidden_size = 8
vision_layers = 1
vision_heads = 1
hidden_size = 16
intermediate_size = 32
num_layers = 1
num_heads = 4
num_kv_heads = 2
vocab_size = 1000000
rope_base = 10000.0

[[stage]]
name = "s"
init = "base"
trainable = ["llm"]
context = {context}
lr = 1e-3
schedule = "constant"
global_batch = {global_batch}
epochs = 1
seed = {seed}
  [[stage.source]]
  name = "a"
  query = "source = 'a'"
  repeat = {}
  [[stage.source]]
  name = "b"
  query = "SELECT sample_id FROM samples WHERE source = 'b'"
  repeat = {}
"#,
        repeats.0, repeats.1
    ))
    .unwrap()
}

fn samples_strategy() -> impl Strategy<Value = Vec<Fake>> {
    prop::collection::vec(
        (prop::bool::ANY, 1u32..60, 0u32..3).prop_map(|(a, tokens, images)| Fake {
            source: if a { "a" } else { "b" },
            tokens,
            images,
        }),
        4..40,
    )
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mixes_and_loaders_keep_their_invariants(
        samples in samples_strategy(),
        repeats in (1u32..3, 1u32..3),
        seed in 0u64..1000,
    ) {
        // Context 80 with 4 tokens per image (32 px, 8 px patches): every fake sample fits.
        let context = 80;
        let dir = tempfile::tempdir().unwrap();
        write_shards(&dir.path().join("shards"), &samples);
        let recipe = recipe(context, 4, repeats, seed);
        let catalog = run(Catalog::open(&dir.path().join("shards"))).unwrap();
        let meta = run(build_mix(&catalog, &recipe, 1, &dir.path().join("mixes"))).unwrap();
        let mix = Mix::open(&dir.path().join("mixes/stage-1")).unwrap();
        prop_assert_eq!(meta.packs as usize, mix.num_packs());

        // Every selected sample appears exactly its repeat count in the mix.
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for p in 0..mix.num_packs() as u32 {
            let pack = mix.pack(p).unwrap();
            // No pack exceeds the context; positions restart at every boundary;
            // the first token of every sample is masked.
            prop_assert!(pack.expanded_tokens <= context);
            for w in pack.boundaries.windows(2) {
                let (a, b) = (w[0] as usize, w[1] as usize);
                prop_assert_eq!(&pack.position_ids[a..b], &(0..(b - a) as u32).collect::<Vec<_>>()[..]);
                prop_assert_eq!(pack.loss_mask[a], 0);
                // Tokens of one sample all come from that sample (k*1000 + i).
                prop_assert!(pack.input_ids[a..b].iter().all(|t| t / 1000 == pack.input_ids[a] / 1000));
            }
            for id in pack.sample_ids {
                *counts.entry(id).or_default() += 1;
            }
        }
        for (i, s) in samples.iter().enumerate() {
            let want = if s.source == "a" { repeats.0 } else { repeats.1 };
            prop_assert_eq!(counts.get(&format!("{i:032x}")).copied().unwrap_or(0), want, "sample {}", i);
        }

        if mix.steps_per_epoch() == 0 {
            return Ok(());
        }
        // World sizes 1, 2 and 4 give the same global batches; ranks' slices
        // are disjoint and make up the global batch; an epoch visits distinct packs.
        let steps = mix.steps_per_epoch() * 2;
        let global = |world: u32| -> Vec<Vec<u32>> {
            (0..steps)
                .map(|step| {
                    (0..world)
                        .flat_map(|r| Loader::new(mix.clone(), r, world).unwrap().batch(step).unwrap().packs.into_iter().map(|p| p.pack_id))
                        .collect()
                })
                .collect()
        };
        let one = global(1);
        prop_assert_eq!(&one, &global(2));
        prop_assert_eq!(&one, &global(4));
        let epoch0: Vec<u32> = one[..mix.steps_per_epoch() as usize].concat();
        prop_assert_eq!(epoch0.iter().collect::<BTreeSet<_>>().len(), epoch0.len());

        // Resuming at step k gives the batches of an uninterrupted run.
        let loader = || Loader::new(mix.clone(), 1, 2).unwrap();
        let full: Vec<_> = loader().stream(0, steps, 2).iter().map(|b| b.unwrap()).collect();
        let k = steps / 2 + 1;
        let resumed: Vec<_> = loader().stream(k, steps - k, 2).iter().map(|b| b.unwrap()).collect();
        prop_assert_eq!(&full[k as usize..], &resumed[..]);
    }
}

#[test]
fn the_same_inputs_give_byte_identical_mixes() {
    let samples: Vec<Fake> = (0..30)
        .map(|i| Fake {
            source: if i % 3 == 0 { "a" } else { "b" },
            tokens: 5 + i % 17,
            images: i % 2,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_shards(&dir.path().join("shards"), &samples);
    let recipe = recipe(64, 2, (2, 1), 7);
    let catalog = run(Catalog::open(&dir.path().join("shards"))).unwrap();
    for out in ["m1", "m2"] {
        run(build_mix(&catalog, &recipe, 1, &dir.path().join(out))).unwrap();
    }
    for file in [
        "samples.arrow",
        "packs.arrow",
        "mix_report.arrow",
        "mix.json",
    ] {
        let a = std::fs::read(dir.path().join("m1/stage-1").join(file)).unwrap();
        let b = std::fs::read(dir.path().join("m2/stage-1").join(file)).unwrap();
        assert!(a == b, "{file} differs");
    }
    // Another seed orders differently.
    let other = recipe_with_seed(8);
    run(build_mix(&catalog, &other, 1, &dir.path().join("m3"))).unwrap();
    assert_ne!(
        std::fs::read(dir.path().join("m1/stage-1/samples.arrow")).unwrap(),
        std::fs::read(dir.path().join("m3/stage-1/samples.arrow")).unwrap()
    );
}

fn recipe_with_seed(seed: u64) -> Recipe {
    recipe(64, 2, (2, 1), seed)
}

/// A mix whose files were damaged after they were written is an error that
/// names the file, never a panic: a footer length past the start of the
/// file, and every single-byte flip in the footer region.
#[test]
fn damaged_mix_files_are_errors_not_panics() {
    let samples: Vec<Fake> = (0..20)
        .map(|i| Fake {
            source: "a",
            tokens: 5 + i % 7,
            images: i % 2,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_shards(&dir.path().join("shards"), &samples);
    let catalog = run(Catalog::open(&dir.path().join("shards"))).unwrap();
    let mixes = dir.path().join("mixes");
    run(build_mix(&catalog, &recipe_with_seed(3), 1, &mixes)).unwrap();
    let stage = mixes.join("stage-1");
    let good = std::fs::read(stage.join("samples.arrow")).unwrap();
    let damaged = |bytes: &[u8]| {
        std::fs::write(stage.join("samples.arrow"), bytes).unwrap();
        let opened = std::panic::catch_unwind(|| {
            Mix::open(&stage).and_then(|mix| {
                let loader = Loader::new(mix, 0, 1)?;
                for step in 0..2 {
                    loader.batch(step)?;
                }
                Ok(())
            })
        });
        opened.expect("no panic on a damaged mix")
    };
    // The footer length (the 4 bytes before the closing "ARROW1") says more
    // than the file holds.
    let mut bytes = good.clone();
    let at = bytes.len() - 10;
    bytes[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
    let err = damaged(&bytes).unwrap_err().to_string();
    assert!(err.contains("samples.arrow"), "{err}");
    // Every byte of the footer flipped in turn: an error or, where the flip
    // changes nothing the reader uses, a mix that still reads.
    let footer = i32::from_le_bytes(good[at..at + 4].try_into().unwrap()) as usize;
    for i in at - footer..at {
        let mut bytes = good.clone();
        bytes[i] ^= 0xFF;
        let _ = damaged(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the bytes of a recipe, parsing and checking it end without
    /// a panic (starting from the shipped tiny recipe, mutated).
    #[test]
    fn recipes_parse_and_check_on_any_bytes(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = include_bytes!("../../recipes/tiny.toml").to_vec();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte;
        }
        bytes.truncate(cut.index(bytes.len()) + bytes.len() / 2);
        if let Ok(recipe) = Recipe::parse(&String::from_utf8_lossy(&bytes)) {
            let _ = recipe.check();
        }
    }
}
