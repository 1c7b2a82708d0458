//! Models in and out through the binary: a trained run answers with
//! `generate`, exports as a VILA folder that `generate` and `train --init
//! hf:` take back with the same numbers, what Qwen2 cannot express is
//! refused, and a stock tokenizer builds shards with its media tokens added.

mod common;

use common::*;
use serde_json::Value;

/// tiny.toml with global batches for the tiny corpus, and RoPE on every
/// dimension (Qwen2's), so that the model exports.
fn exportable_recipe(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(format!("{}/recipes/tiny.toml", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
        .replace("global_batch = 8", "global_batch = 2")
        .replace("global_batch = 4", "global_batch = 1")
        .replace("partial_rotary_factor = 0.5\n", "");
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn first_loss(run: &str) -> f64 {
    let text = std::fs::read_to_string(format!("{run}/metrics.jsonl")).unwrap();
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    line["loss"].as_f64().unwrap()
}

#[test]
fn a_run_generates_exports_and_starts_a_stage_from_its_export() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let recipe = exportable_recipe(dir.path());
    lvpipe_ok(corpus, &build_args(&d("shards"), &[]));
    mix_ok(corpus, &recipe, "3", &d("shards"), &d("mixes"));
    let train = |out: &str, init: Option<&str>| {
        let mix = d("mixes/stage-3");
        let mut args = vec![
            "train",
            "--recipe",
            &recipe,
            "--stage",
            "3",
            "--mix",
            &mix,
            "--tokenizer",
            "raw/tokenizer.json",
            "--out",
            out,
            "--steps",
            "2",
        ];
        if let Some(init) = init {
            args.extend(["--init", init]);
        }
        lvpipe_ok(corpus, &args);
    };
    let run = d("runs/a");
    train(&run, None);

    // generate: one JSON object, the image's placeholder in the prompt.
    let image = std::fs::read_dir(corpus.join("raw/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .unwrap();
    let image = image.to_str().unwrap();
    let generate_in = |model: &str, dtype: &str| -> Value {
        let out = lvpipe_ok(
            corpus,
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "What colour is the shape?",
                "--image",
                image,
                "--max-new-tokens",
                "6",
                "--dtype",
                dtype,
                "--json",
            ],
        );
        serde_json::from_str(out.trim()).unwrap()
    };
    let generate = |model: &str| generate_in(model, "f32");
    let g = generate(&run);
    // In bf16 the first token's log-probability moves by rounding only.
    let first = |g: &Value| g["logprobs"][0].as_f64().unwrap();
    let half = generate_in(&run, "bf16");
    assert_ne!(first(&half), first(&g), "bf16 computed nothing in bf16");
    assert!(
        (first(&half) - first(&g)).abs() <= 0.05 * first(&g).abs() + 0.02,
        "{half} against {g}"
    );
    let tokens = g["tokens"].as_array().unwrap();
    let logprobs = g["logprobs"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 6, "{g}");
    assert_eq!(tokens.len(), logprobs.len());
    assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0), "{g}");
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("raw/tokenizer.json")).unwrap())
            .unwrap();
    let image_id = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == "<image>")
        .unwrap()["id"]
        .clone();
    assert!(
        g["prompt_tokens"].as_array().unwrap().contains(&image_id),
        "{g}"
    );
    assert!(g["text"].is_string());
    // A video becomes one placeholder per sampled frame.
    let v = lvpipe_ok(
        corpus,
        &[
            "generate",
            "--model",
            &run,
            "--prompt",
            "Which way does the shape move?",
            "--video",
            "raw/videos/clip-00000.mp4",
            "--frames",
            "uniform:4",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(v.trim()).unwrap();
    let frames = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| **t == image_id)
        .count();
    assert_eq!(frames, 4, "{v}");

    // VILA export: generate gives the same tokens and log-probabilities.
    let vila = d("release");
    let files = lvpipe_ok(
        corpus,
        &["export", "--run", &run, "--format", "vila", "--out", &vila],
    );
    for f in [
        "llm/config.json",
        "llm/model.safetensors",
        "llm/tokenizer.json",
        "vision_tower/config.json",
        "mm_projector/model.safetensors",
        "config.json",
    ] {
        assert!(files.contains(f), "{f} not in {files}");
    }
    let h = generate(&format!("hf:{vila}"));
    assert_eq!(h["tokens"], g["tokens"]);
    assert_eq!(h["prompt_tokens"], g["prompt_tokens"]);
    for (a, b) in logprobs.iter().zip(h["logprobs"].as_array().unwrap()) {
        assert!(
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5,
            "{g} vs {h}"
        );
    }

    // A stage started from the export computes what one started from the
    // run does: the same first loss.
    let (from_run, from_export) = (d("runs/from-run"), d("runs/from-export"));
    train(&from_run, Some(&run));
    train(&from_export, Some(&format!("hf:{vila}")));
    let (a, b) = (first_loss(&from_run), first_loss(&from_export));
    assert!((a - b).abs() < 1e-6 * a.abs(), "{a} vs {b}");
    // The recipe form: stage 3 of a chain starts from the export's parts.
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "init = \"pretrain\"",
        &format!(
            "init = {{ llm = \"hf:{vila}/llm\", vision = \"hf:{vila}/vision_tower\", projector = \"hf:{vila}/mm_projector\" }}"
        ),
    );
    let parts_recipe = d("parts.toml");
    std::fs::write(&parts_recipe, text).unwrap();
    lvpipe_ok(
        corpus,
        &[
            "train",
            "--recipe",
            &parts_recipe,
            "--stages",
            "3",
            "--shards",
            &d("shards"),
            "--tokenizer",
            "raw/tokenizer.json",
            "--out",
            &d("chain"),
            "--steps",
            "2",
        ],
    );
    let c = first_loss(&d("chain/stage-3"));
    assert!((c - b).abs() < 1e-6 * b.abs(), "{c} vs {b}");

    // What Qwen2 cannot express is refused, naming the setting.
    let edited = d("runs/partial");
    std::fs::create_dir_all(&edited).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(format!("{run}/{f}"), format!("{edited}/{f}")).unwrap();
    }
    let config = format!("{edited}/config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["model"]["llm"]["partial_rotary_factor"] = 0.5.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let out = lvpipe(
        corpus,
        &[
            "export",
            "--run",
            &edited,
            "--format",
            "hf",
            "--out",
            &d("no"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("partial_rotary_factor"), "{err}");
    assert!(!dir.path().join("no").exists());
}

#[test]
fn a_stock_tokenizer_builds_shards_with_its_media_tokens_added() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let packed = std::fs::read(format!(
        "{}/fixtures/tokenizers/qwen2.tokenizer.json.zst",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let qwen = dir.path().join("qwen2.json");
    std::fs::write(&qwen, zstd::decode_all(packed.as_slice()).unwrap()).unwrap();
    let shards = dir.path().join("shards");
    let shards = shards.to_str().unwrap();
    let mut args = build_args(shards, &[]);
    let at = args
        .iter()
        .position(|a| *a == "raw/tokenizer.json")
        .unwrap();
    args[at] = qwen.to_str().unwrap();
    lvpipe_ok(corpus, &args);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{shards}/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["added_tokens"],
        serde_json::json!(["<image>", "<video>"])
    );
    // The shards' tokenizer has them, at the ids the samples use.
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{shards}/tokenizer.json")).unwrap())
            .unwrap();
    let id_of = |name: &str| {
        tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["content"] == name)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let image = id_of("<image>");
    assert_eq!((image, id_of("<video>")), (151646, 151647));
    let rows = sql_json(
        corpus,
        shards,
        &format!("SELECT count(*) AS n FROM samples WHERE array_has(input_ids, {image})"),
    );
    assert!(rows[0]["n"].as_u64().unwrap() > 0, "{rows:?}");
    // The tiny recipe's vocabulary cannot hold Qwen2's: a clear error, exit 2.
    let recipe = format!("{}/recipes/tiny.toml", env!("CARGO_MANIFEST_DIR"));
    let mixes = dir.path().join("mixes");
    // (mix does not look at ids; train refuses before it starts.)
    mix_ok(corpus, &recipe, "2", shards, mixes.to_str().unwrap());
    let mix = mixes.join("stage-2");
    let run = dir.path().join("run");
    let out = lvpipe(
        corpus,
        &[
            "train",
            "--recipe",
            &recipe,
            "--stage",
            "2",
            "--mix",
            mix.to_str().unwrap(),
            "--tokenizer",
            &format!("{shards}/tokenizer.json"),
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("151648") && err.contains("vocab"),
        "{err}"
    );
}

/// `--device` names a device the build can give, or says why not before any
/// work: a build without CUDA refuses `cuda:0` by name.
#[test]
fn a_device_the_build_cannot_give_is_refused_by_name() {
    let model = format!("{}/fixtures/hf/qwen2-tied", env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        lvpipe(
            dir.path(),
            &[
                "generate",
                "--model",
                &model,
                "--raw",
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "2",
                "--device",
                device,
            ],
        )
    };
    let out = run("gpu:1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--device gpu:1: expected cpu, cuda or cuda:N"),
        "{err}"
    );
    if !cfg!(feature = "cuda") {
        let out = run("cuda:0");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("built without CUDA"), "{err}");
    }
}
