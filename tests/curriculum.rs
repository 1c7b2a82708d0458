//! plan -> mix -> stream through the binary, on the tiny synthetic corpus.

mod common;

use common::*;

/// A recipe with one of each problem `plan` must find.
const BROKEN: &str = r#"
[model]
image_size = 64
patch_size = 8
vision_hidden_size = 32
vision_layers = 1
vision_heads = 2
hidden_size = 64
intermediate_size = 128
num_layers = 1
num_heads = 6
num_kv_heads = 3
vocab_size = 100
rope_base = 10000.0
initializer_range = 0.0
init_std = { lm_head = 0.02, wq = 0.1, k_proj = -1.0 }
partial_rotary_factor = 1.5
chat_template = "vicuna_v1"

[[stage]]
name = "one"
init = "two"
trainable = ["projector", "lm_head_only"]
context = 40
frames = "uniform:9"
lr = 1e-3
schedule = "cosine"
global_batch = 2
epochs = 1
seed = 1
sequence_parallel = 4
  [[stage.source]]
  name = "broken-sql"
  query = "source = = 'sft'"
  repeat = 1
  [[stage.source]]
  name = "nothing"
  query = "source = 'no-such-source'"
  repeat = 1

[[stage]]
name = "two"
init = "one"
trainable = ["llm"]
context = 64
lr = 1e-3
schedule = "constant"
global_batch = 2
epochs = 1
seed = 2
adam_beta2 = 1.0
weight_decay = -0.1
  [[stage.source]]
  name = "captions"
  query = "source = 'pretrain'"
  repeat = 1
  part = 2
"#;

const GOOD: &str = r#"
[model]
image_size = 64
patch_size = 8
vision_hidden_size = 32
vision_layers = 1
vision_heads = 2
hidden_size = 64
intermediate_size = 128
num_layers = 1
num_heads = 4
num_kv_heads = 2
vocab_size = 1024
rope_base = 10000.0

[[stage]]
name = "sft"
init = "base"
trainable = ["projector", "llm"]
context = 256
lr = 1e-3
schedule = "cosine"
global_batch = 4
epochs = 1
seed = 1
  [[stage.source]]
  name = "vqa"
  query = "source = 'sft'"
  repeat = 2
  [[stage.source]]
  name = "captions"
  query = "SELECT sample_id FROM samples WHERE source = 'pretrain' AND num_text_tokens < 80"
  repeat = 1
"#;

fn shards(dir: &std::path::Path) -> String {
    let out = dir.join("shards");
    lvpipe_ok(tiny_corpus(), &build_args(out.to_str().unwrap(), &[]));
    out.to_str().unwrap().to_string()
}

#[test]
fn plan_lists_every_problem_of_a_broken_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let shards = shards(dir.path());
    let recipe = dir.path().join("broken.toml");
    std::fs::write(&recipe, BROKEN).unwrap();
    let res = lvpipe(
        tiny_corpus(),
        &[
            "plan",
            "--recipe",
            recipe.to_str().unwrap(),
            "--shards",
            &shards,
        ],
    );
    assert_eq!(res.status.code(), Some(1));
    let text = String::from_utf8_lossy(&res.stdout);
    for expected in [
        "stage 1 (one): unknown trainable module `lm_head_only`",
        "stage 1 (one): sequence_parallel 4 does not divide num_heads 6",
        "stage 1 (one): sequence_parallel 4 and num_kv_heads 3 neither divides the other",
        "stage 1 (one): frames `uniform:9` gives 9 frames, not a multiple of sequence_parallel 4",
        "stage 1 (one), source broken-sql: the query does not parse",
        "stage 1 (one), source nothing: the query selects no samples",
        "stage 1 (one): init `two` is not an earlier stage",
        "model: chat template `vicuna_v1` but the shards were tokenized with `chatml`",
        "model: vocab_size 100 but the shards hold token id",
        "stage 2 (two), source captions: 48 of 48 samples are longer than the context 64",
        "model: initializer_range 0 must be positive",
        "model: init_std names `wq`, not one of embed_tokens, q_proj",
        "model: init_std.k_proj -1 must be positive",
        "model: partial_rotary_factor 1.5 must be in (0, 1]",
        "stage 2 (two): adam_beta2 1 must be in [0, 1)",
        "stage 2 (two): weight_decay -0.1 must be at least 0",
        "stage 2 (two), source captions: `part` needs order = \"sequential\"",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[test]
fn mix_is_reproducible_and_streams_what_plan_promised() {
    let dir = tempfile::tempdir().unwrap();
    let shards = shards(dir.path());
    let recipe = dir.path().join("good.toml");
    std::fs::write(&recipe, GOOD).unwrap();
    let recipe = recipe.to_str().unwrap();
    let plan = lvpipe_ok(
        tiny_corpus(),
        &["plan", "--recipe", recipe, "--shards", &shards, "--json"],
    );
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["ok"], true, "{plan}");
    let stage = &plan["stages"][0];

    let mixes: Vec<String> = ["m1", "m2"]
        .iter()
        .map(|m| dir.path().join(m).to_str().unwrap().to_string())
        .collect();
    for out in &mixes {
        mix_ok(tiny_corpus(), recipe, "1", &shards, out);
    }
    for file in [
        "samples.arrow",
        "packs.arrow",
        "mix_report.arrow",
        "mix.json",
    ] {
        let a = std::fs::read(format!("{}/stage-1/{file}", mixes[0])).unwrap();
        let b = std::fs::read(format!("{}/stage-1/{file}", mixes[1])).unwrap();
        assert!(
            a == b,
            "{file} differs between two mixes of the same inputs"
        );
    }
    let shares = lvpipe_ok(
        tiny_corpus(),
        &[
            "sql",
            "--shards",
            &shards,
            "--mixes",
            &mixes[0],
            "--format",
            "json",
            "SELECT source, samples, target_share, realized_share FROM mix_report WHERE stage = 1 ORDER BY source",
        ],
    );
    let rows: Vec<serde_json::Value> = shares
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 16 VQA samples twice, and the short captions once.
    assert_eq!(rows[1]["source"], "vqa");
    assert_eq!(rows[1]["samples"], 32);
    let total: u64 = rows.iter().map(|r| r["samples"].as_u64().unwrap()).sum();
    assert_eq!(Some(total), stage["samples"].as_u64());

    // Two ranks of a world of 2 at step 1 are the two halves of rank 0 of a world of 1.
    let stream = |rank: &str, world: &str| -> serde_json::Value {
        let text = lvpipe_ok(
            tiny_corpus(),
            &[
                "stream",
                "--mix",
                &format!("{}/stage-1", mixes[0]),
                "--rank",
                rank,
                "--world-size",
                world,
                "--from-step",
                "1",
                "--steps",
                "1",
                "--json",
            ],
        );
        serde_json::from_str(text.trim()).unwrap()
    };
    let whole = stream("0", "1");
    let (r0, r1) = (stream("0", "2"), stream("1", "2"));
    assert_eq!(whole["step"], 1);
    assert_eq!(r1["rank"], 1);
    let packs = |v: &serde_json::Value| v["packs"].as_array().unwrap().clone();
    assert_eq!(packs(&whole), [packs(&r0), packs(&r1)].concat());
    assert_eq!(packs(&whole).len(), 4);
    for p in packs(&whole) {
        assert!(p["tokens"].as_u64().unwrap() <= 256);
    }
    // Media come decoded to the model's input: [media, 3, 64, 64] in [-1, 1].
    let mix =
        lvpipe_pipeline::Mix::open(std::path::Path::new(&format!("{}/stage-1", mixes[0]))).unwrap();
    let batch = lvpipe_pipeline::Loader::new(mix, 0, 1)
        .unwrap()
        .batch(0)
        .unwrap();
    let mut images = 0;
    for (pack, json) in batch.packs.iter().zip(packs(&whole_step0(&mixes[0]))) {
        assert_eq!(u64::from(pack.num_media), json["media"].as_u64().unwrap());
        assert_eq!(
            pack.num_media as usize,
            pack.sample_ids.len(),
            "every sample of this mix has one image"
        );
        assert_eq!(pack.pixels.len(), pack.num_media as usize * 3 * 64 * 64);
        assert!(pack.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Light backgrounds and saturated shapes: both ends of the range occur.
        assert!(pack.pixels.iter().any(|&v| v > 0.7) && pack.pixels.iter().any(|&v| v < -0.3));
        images += pack.num_media;
    }
    assert!(images > 0);

    let bad = lvpipe(
        tiny_corpus(),
        &[
            "stream",
            "--mix",
            &format!("{}/stage-1", mixes[0]),
            "--world-size",
            "3",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must divide the global batch 4"));
}

fn whole_step0(mix: &str) -> serde_json::Value {
    let text = lvpipe_ok(
        tiny_corpus(),
        &["stream", "--mix", &format!("{mix}/stage-1"), "--json"],
    );
    serde_json::from_str(text.trim()).unwrap()
}

#[test]
fn sequential_stage_streams_its_sources_in_turn_every_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let shards = shards(dir.path());
    // The source each sample of epoch `epoch` comes from, in streaming order.
    let stream = |name: &str, recipe_text: &str, epoch: u64| -> Vec<String> {
        let recipe = dir.path().join(format!("{name}.toml"));
        std::fs::write(&recipe, recipe_text).unwrap();
        let out = dir.path().join(name);
        mix_ok(
            tiny_corpus(),
            recipe.to_str().unwrap(),
            "1",
            &shards,
            out.to_str().unwrap(),
        );
        let mix = lvpipe_pipeline::Mix::open(&out.join("stage-1")).unwrap();
        let steps = mix.steps_per_epoch();
        let loader = lvpipe_pipeline::Loader::new(mix, 0, 1).unwrap();
        (epoch * steps..(epoch + 1) * steps)
            .flat_map(|step| loader.batch(step).unwrap().packs)
            .flat_map(|pack| pack.sources)
            .collect()
    };
    let switches = |sources: &[String]| sources.windows(2).filter(|w| w[0] != w[1]).count();

    let sequential = GOOD.replace("seed = 1\n", "seed = 1\norder = \"sequential\"\n");
    let first = stream("sequential", &sequential, 0);
    // Shard sources: the recipe's "vqa" is `sft`, its "captions" `pretrain`.
    assert!(first.iter().any(|s| s == "pretrain"), "{first:?}");
    assert_eq!(first[0], "sft");
    assert_eq!(switches(&first), 1, "all VQA, then all captions: {first:?}");
    assert_eq!(stream("sequential", &sequential, 1), first);
    // `part` reorders the turns, and sources of one part share a turn.
    let reversed = sequential.replace("repeat = 1\n", "repeat = 1\n  part = 0\n");
    let turned = stream("reversed", &reversed, 0);
    assert_eq!(turned[0], "pretrain");
    assert_eq!(switches(&turned), 1, "{turned:?}");
    let together = sequential.replace("repeat = 2\n", "repeat = 2\n  part = 2\n");
    assert!(switches(&stream("together", &together, 0)) > 4);

    // Shuffled (the default), the sources alternate.
    assert!(switches(&stream("shuffled", GOOD, 0)) > 4);
}
