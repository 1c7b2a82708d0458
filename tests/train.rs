//! mix -> train through the binary: checkpoints, metrics, stage hand-over.

mod common;

use common::*;

fn recipe() -> String {
    format!("{}/recipes/tiny.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn stages_train_checkpoint_and_hand_over() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let shards = d("shards");
    lvpipe_ok(corpus, &build_args(&shards, &[]));
    let recipe = recipe();
    for stage in ["2", "3"] {
        mix_ok(corpus, &recipe, stage, &shards, &d("mixes"));
    }
    let train = |stage: &str, out: &str, extra: &[&str]| {
        let mix = d(&format!("mixes/stage-{stage}"));
        let mut args = vec![
            "train",
            "--recipe",
            &recipe,
            "--stage",
            stage,
            "--mix",
            &mix,
            "--tokenizer",
            "raw/tokenizer.json",
            "--out",
            out,
        ];
        args.extend(extra);
        lvpipe(corpus, &args)
    };

    let one = d("runs/stage-2");
    let out = train("2", &one, &["--steps", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(format!("{one}/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        assert!(line["loss"].as_f64().unwrap().is_finite());
        assert!(line["loss_tokens"].as_f64().unwrap() > 0.0);
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{one}/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (state["step"].as_u64(), state["stage_name"].as_str()),
        (Some(3), Some("pretrain"))
    );

    // Stage 3 starts from stage 2's weights: with no steps, it writes them back
    // unchanged (the checkpoint round-trips byte for byte).
    let three = d("runs/stage-3");
    let out = train("3", &three, &["--init", &one, "--steps", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(format!("{one}/model.safetensors")).unwrap(),
        std::fs::read(format!("{three}/model.safetensors")).unwrap()
    );
    let out = train("3", &three, &["--init", &one, "--steps", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A tokenizer other than the shards' is refused.
    std::fs::write(dir.path().join("other.json"), "{}").unwrap();
    let mix = d("mixes/stage-2");
    let other = d("other.json");
    let out = lvpipe(
        corpus,
        &[
            "train",
            "--recipe",
            &recipe,
            "--stage",
            "1",
            "--mix",
            &mix,
            "--tokenizer",
            &other,
            "--out",
            &d("runs/x"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
}

/// tiny.toml with global batches small enough for the tiny corpus, all of
/// its four long notes where stage 5 takes a sixteenth of them (by sample
/// id), and a RoPE base that stage 2 raises in two steps.
fn small_batch_recipe(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(recipe())
        .unwrap()
        .replace("global_batch = 8", "global_batch = 2")
        .replace("global_batch = 4", "global_batch = 1")
        .replace(" AND sample_id < '1'", "")
        .replace(
            "name = \"pretrain\"\n",
            "name = \"pretrain\"\nrope_base = [200000.0, 400000.0]\n",
        );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `train --stages 1-2` of `recipe` over `shards` into `out`, 4 steps a
/// stage, a checkpoint every 2, and `extra` arguments.
fn train_two_stages(
    corpus: &std::path::Path,
    recipe: &str,
    shards: &str,
    out: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "train",
        "--recipe",
        recipe,
        "--stages",
        "1-2",
        "--shards",
        shards,
        "--tokenizer",
        "raw/tokenizer.json",
        "--out",
        out,
        "--steps",
        "4",
        "--save-every",
        "2",
    ];
    args.extend(extra);
    lvpipe(corpus, &args)
}

/// Stages 1 and 2 of chains `a` and `b` ran 4 steps each with the same
/// losses and ended with the same weights, byte for byte.
fn same_two_stages(a: &str, b: &str) {
    for stage in ["stage-1", "stage-2"] {
        let (la, lb) = (
            losses(&format!("{a}/{stage}")),
            losses(&format!("{b}/{stage}")),
        );
        assert_eq!(la.len(), 4);
        assert_eq!(la, lb, "{stage}: the resumed run's losses differ");
        assert_eq!(
            std::fs::read(format!("{a}/{stage}/model.safetensors")).unwrap(),
            std::fs::read(format!("{b}/{stage}/model.safetensors")).unwrap(),
            "{stage}"
        );
    }
}

fn losses(run: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(format!("{run}/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn a_killed_chain_resumes_with_the_same_losses_and_its_lineage_is_queryable() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let shards = d("shards");
    lvpipe_ok(corpus, &build_args(&shards, &[]));
    let recipe = small_batch_recipe(dir.path());
    let chain = |out: &str, extra: &[&str]| train_two_stages(corpus, &recipe, &shards, out, extra);
    let (a, b) = (d("runs-a"), d("runs-b"));
    let out = chain(&a, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Killed right after step 3 of stage 1: the newest checkpoint is step 2.
    let out = chain(&b, &["--abort-after", "3"]);
    assert!(!out.status.success());
    assert_eq!(losses(&format!("{b}/stage-1")).len(), 3);
    assert!(std::path::Path::new(&format!("{b}/stage-1/checkpoints/step-000002")).exists());
    assert!(!std::path::Path::new(&format!("{b}/stage-1/trainer_state.json")).exists());
    // What a kill while the resume rewrites its records leaves: half-written
    // temporary files beside run.json, tokenizer.json and metrics.jsonl, and
    // a metrics line cut short (files are replaced by rename, so the records
    // themselves are whole).
    let stage1 = std::path::Path::new(&b).join("stage-1");
    for name in ["run.json.tmp", "tokenizer.json.tmp", "metrics.jsonl.tmp"] {
        std::fs::write(stage1.join(name), b"{\"half").unwrap();
    }
    let mut metrics = std::fs::read_to_string(stage1.join("metrics.jsonl")).unwrap();
    metrics.push_str("{\"step\": 4, \"lo");
    std::fs::write(stage1.join("metrics.jsonl"), metrics).unwrap();
    let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &format!("{b}/stage-1")]);
    assert!(err.contains("resumed after step 2"), "{err}");
    // The chain skips the finished stage 1 and trains stage 2 from it.
    let out = chain(&b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("finished earlier"),
        "{err}"
    );
    same_two_stages(&a, &b);
    // Stage 1 keeps the model's RoPE base; stage 2 raises it halfway through
    // and hands the raised base on.
    let bases = |stage: &str| -> Vec<f64> {
        std::fs::read_to_string(format!("{a}/{stage}/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["rope_base"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(bases("stage-1"), [160000.0; 4]);
    assert_eq!(bases("stage-2"), [200000.0, 200000.0, 400000.0, 400000.0]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{a}/stage-2/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["model"]["llm"]["rope_theta"].as_f64(),
        Some(400000.0)
    );
    // Resuming a finished stage does nothing.
    let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &format!("{b}/stage-2")]);
    assert!(err.contains("nothing to resume"), "{err}");
    // Stage 1 trained again (other steps, so other weights): the chain keeps
    // it, and trains stage 2 again because its start changed.
    let err = lvpipe_ok_stderr(
        corpus,
        &[
            "train",
            "--recipe",
            &recipe,
            "--stage",
            "1",
            "--mix",
            &format!("{b}/mixes/stage-1"),
            "--tokenizer",
            "raw/tokenizer.json",
            "--out",
            &format!("{b}/stage-1"),
            "--steps",
            "3",
        ],
    );
    assert!(err.contains("3 steps"), "{err}");
    let out = chain(&b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stage 1 (align): finished earlier"), "{err}");
    assert!(
        err.contains("other start weights; training it again"),
        "{err}"
    );
    assert_ne!(
        std::fs::read(format!("{a}/stage-2/model.safetensors")).unwrap(),
        std::fs::read(format!("{b}/stage-2/model.safetensors")).unwrap(),
    );

    // Lineage: every step's samples add up to the tokens the step trained on,
    // and per-source tokens add up too.
    let q = |sql: &str| -> Vec<serde_json::Value> {
        lvpipe_ok(corpus, &["sql", "--runs", &a, "--format", "json", sql])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = q("SELECT count(*) AS n FROM metrics m JOIN \
                  (SELECT stage, step, sum(tokens) AS t FROM lineage GROUP BY stage, step) l \
                  ON m.stage = l.stage AND m.step = l.step WHERE m.tokens = l.t");
    assert_eq!(rows[0]["n"], 8);
    let rows = q("SELECT count(*) AS n FROM metrics m JOIN \
                  (SELECT stage, step, sum(tokens) AS t FROM source_tokens GROUP BY stage, step) s \
                  ON m.stage = s.stage AND m.step = s.step WHERE m.tokens = s.t");
    assert_eq!(rows[0]["n"], 8);
    let rows = q("SELECT DISTINCT source FROM lineage WHERE stage = 1 ORDER BY source");
    let sources: Vec<&str> = rows.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert!(
        sources
            .iter()
            .all(|s| ["pretrain", "pairs-000"].contains(s)),
        "{sources:?}"
    );
}

#[test]
fn the_demo_trains_every_stage_evaluates_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = small_batch_recipe(dir.path());
    let out = lvpipe(
        dir.path(),
        &[
            "demo",
            "--out",
            "demo",
            "--scale",
            "tiny",
            "--recipe",
            &recipe,
            "--steps",
            "2",
            "--eval-limit",
            "4",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let demo = dir.path().join("demo");
    let report = std::fs::read_to_string(demo.join("report.md")).unwrap();
    for needle in [
        "## Training",
        "## Evaluation",
        "runs/loss.png",
        "| 5 long-sft | 2 |",
    ] {
        assert!(
            report.contains(needle),
            "no `{needle}` in the report:\n{report}"
        );
    }
    for (stage, suites) in [
        (1, &["vqa"][..]),
        (3, &["vqa", "niah_text", "ppl"][..]),
        (5, &["vqa", "niah_text", "niah_video", "ppl"][..]),
    ] {
        let path = demo.join(format!("eval/stage-{stage}/eval.json"));
        let eval: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(eval["stage"], stage);
        for suite in suites {
            let acc = eval[suite]["accuracy"].as_f64();
            assert!(acc.is_some_and(|a| a >= 0.0), "{}: {suite}", path.display());
        }
        // 4 image questions at most, and every held-out clip question (4);
        // the wrong answers come back as generated.
        if let Some(n) = eval["vqa"]["n"].as_u64() {
            assert!((1..=8).contains(&n), "{n}");
            let correct: u64 = eval["vqa"]["table"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["correct"].as_u64().unwrap())
                .sum();
            let misses = eval["vqa"]["misses"].as_array().unwrap();
            assert_eq!(misses.len() as u64, n - correct);
            for m in misses {
                assert_ne!(m["generated"], m["answer"], "{m}");
                assert!(m["question"].as_str().unwrap().ends_with('?'), "{m}");
            }
        }
        // Wrong needle answers come back as generated, up to 8.
        if let Some(table) = eval["niah_text"]["table"].as_array() {
            let wrong: u64 = table
                .iter()
                .map(|c| c["n"].as_u64().unwrap() - c["correct"].as_u64().unwrap())
                .sum();
            let misses = eval["niah_text"]["misses"].as_array().unwrap();
            assert_eq!(misses.len() as u64, wrong.min(8));
            for m in misses {
                let answer = m["answer"].as_str().unwrap();
                assert!(answer.len() == 4 && answer.parse::<u32>().is_ok(), "{m}");
                let digits: String = m["generated"]
                    .as_str()
                    .unwrap()
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                assert_ne!(digits, answer, "{m}");
            }
        }
    }
    // V-NIAH: the short demo's haystacks of 8 and 16 frames, needles at
    // depths 0, 50% and 100%, one trial per held-out long video (2).
    let eval: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(demo.join("eval/stage-5/eval.json")).unwrap(),
    )
    .unwrap();
    let cells = eval["niah_video"]["table"].as_array().unwrap();
    let frames: Vec<u64> = cells
        .iter()
        .map(|c| c["frames"].as_u64().unwrap())
        .collect();
    assert_eq!(frames, [8, 16, 8, 16, 8, 16]);
    assert!(cells.iter().all(|c| c["n"] == 2), "{cells:?}");
    let misses = eval["niah_video"]["misses"].as_array().unwrap();
    let wrong: u64 = cells
        .iter()
        .map(|c| c["n"].as_u64().unwrap() - c["correct"].as_u64().unwrap())
        .sum();
    assert_eq!(misses.len() as u64, wrong.min(8));
    assert!(eval["niah_video"]["flash_accuracy"].as_f64().is_some());
    // The goals: each stated in the report and goals.json with its verdict.
    let goals: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("goals.json")).unwrap()).unwrap();
    let goals = goals.as_array().unwrap();
    assert!(goals.len() >= 6, "{goals:?}");
    assert!(report.contains("## Goals"), "{report}");
    for g in goals {
        let goal = g["goal"].as_str().unwrap();
        assert!(report.contains(goal), "{goal} not in the report");
        let holds = g["holds"].as_bool().unwrap();
        assert_eq!(holds, g["short_by"].as_f64() == Some(0.0), "{g}");
    }
    let time = goals.last().unwrap();
    assert_eq!(time["goal"], "the whole demo");
    assert!(time["measured"].as_f64().unwrap() > 0.0);
    for png in [
        "runs/loss.png",
        "runs/lr.png",
        "eval/stage-5/niah_text.png",
        "eval/stage-5/niah_video.png",
        "eval/stage-5/niah_video_flash.png",
    ] {
        let bytes = std::fs::read(demo.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
}

#[test]
fn a_step_that_cannot_fit_is_refused_with_an_estimate() {
    let corpus = common::tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    common::lvpipe_ok(corpus, &common::build_args(shards.to_str().unwrap(), &[]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lvpipe"))
        .args([
            "train",
            "--recipe",
            &recipe(),
            "--stages",
            "1",
            "--shards",
            shards.to_str().unwrap(),
            "--tokenizer",
            "raw/tokenizer.json",
            "--out",
            dir.path().join("runs").to_str().unwrap(),
        ])
        // As if 1 MB were left: the first step cannot fit.
        .env("LVPIPE_MEMORY_AVAILABLE", "1000000")
        .current_dir(corpus)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stage 1 (align): a micro-batch of")
            && err.contains("context 512")
            && err.contains("GiB for attention and activations"),
        "{err}"
    );
    assert!(
        !dir.path().join("runs/stage-1/metrics.jsonl").exists() || {
            std::fs::read_to_string(dir.path().join("runs/stage-1/metrics.jsonl"))
                .unwrap()
                .is_empty()
        }
    );
}

/// Stage 1 with 8-bit AdamW, stage 2 with Adafactor and activation
/// checkpointing (and linear RoPE scaling): a kill and `--resume` give the
/// losses and weights of an uninterrupted chain, the optimizers' state
/// files hold their own tensors, and checkpointing changes no loss.
#[test]
fn light_optimizers_and_checkpointing_resume_with_the_same_losses() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let shards = d("shards");
    lvpipe_ok(corpus, &build_args(&shards, &[]));
    let base = small_batch_recipe(dir.path());
    let text = std::fs::read_to_string(&base).unwrap();
    let light = text
        .replace(
            "name = \"align\"\n",
            "name = \"align\"\noptimizer = \"adamw8bit\"\n",
        )
        .replace(
            "name = \"pretrain\"\n",
            "name = \"pretrain\"\noptimizer = \"adafactor\"\ngradient_checkpointing = true\n\
             rope_scaling = { rope_type = \"linear\", factor = 2.0 }\n",
        );
    let plain = light.replace("gradient_checkpointing = true\n", "");
    let (light_recipe, plain_recipe) = (d("light.toml"), d("plain.toml"));
    std::fs::write(&light_recipe, light).unwrap();
    std::fs::write(&plain_recipe, plain).unwrap();
    let chain = |recipe: &str, out: &str, extra: &[&str]| {
        train_two_stages(corpus, recipe, &shards, out, extra)
    };
    let (a, b, c) = (d("runs-a"), d("runs-b"), d("runs-c"));
    let out = chain(&light_recipe, &a, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Killed after step 3 of stage 1, resumed; then (stage 1 finished)
    // killed after step 3 of stage 2, resumed: each from its step 2.
    for stage in ["stage-1", "stage-2"] {
        let out = chain(&light_recipe, &b, &["--abort-after", "3"]);
        assert!(!out.status.success());
        let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &format!("{b}/{stage}")]);
        assert!(err.contains("resumed after step 2"), "{stage}: {err}");
    }
    same_two_stages(&a, &b);
    let state = |stage: &str| -> Vec<String> {
        let bytes = std::fs::read(format!("{a}/{stage}/optimizer.safetensors")).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
        json.as_object().unwrap().keys().cloned().collect()
    };
    assert!(
        state("stage-1")
            .iter()
            .any(|k| k.ends_with(".exp_avg.codes"))
    );
    assert!(
        state("stage-2")
            .iter()
            .any(|k| k.ends_with(".exp_avg_sq_row"))
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{a}/stage-2/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["model"]["llm"]["rope_scaling"]["factor"].as_f64(),
        Some(2.0),
        "{config}"
    );
    // Without checkpointing: the same losses. In bf16: near them.
    let out = chain(&plain_recipe, &c, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = d("runs-bf16");
    let out = chain(&light_recipe, &e, &["--dtype", "bf16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (la, lc, le) = (
        losses(&format!("{a}/stage-2")),
        losses(&format!("{c}/stage-2")),
        losses(&format!("{e}/stage-2")),
    );
    for (((_, x), (_, y)), (_, z)) in la.iter().zip(&lc).zip(&le) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{x} {y}");
        assert!((x - z).abs() <= 0.05 * x.abs(), "f32 {x}, bf16 {z}");
    }
    assert_ne!(la, le, "bf16 computed nothing in bf16");

    // f16 scales its loss; killed and resumed, it goes on with the scale it
    // had (the same losses as straight through), near f32's.
    let (g, h) = (d("runs-f16"), d("runs-f16-resumed"));
    let out = chain(&light_recipe, &g, &["--dtype", "f16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["stage-1", "stage-2"] {
        let out = chain(&light_recipe, &h, &["--dtype", "f16", "--abort-after", "3"]);
        assert!(!out.status.success());
        let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &format!("{h}/{stage}")]);
        assert!(err.contains("resumed after step 2"), "{stage}: {err}");
    }
    same_two_stages(&g, &h);
    let lg = losses(&format!("{g}/stage-2"));
    for ((_, x), (_, z)) in la.iter().zip(&lg) {
        assert!((x - z).abs() <= 0.05 * x.abs(), "f32 {x}, f16 {z}");
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{g}/stage-2/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["loss_scale"]["scale"].as_f64().unwrap() >= 1.0,
        "{state}"
    );
    let metrics = std::fs::read_to_string(format!("{g}/stage-2/metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().all(|l| l.contains("\"loss_scale\"")),
        "{metrics}"
    );
}

#[test]
fn bench_memory_reports_each_setting_and_plots_it() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("curve.png");
    let plot = plot.to_str().unwrap();
    let out = lvpipe_ok(
        dir.path(),
        &[
            "bench-memory",
            "--recipe",
            &recipe(),
            "--contexts",
            "128,512",
            "--checkpointing",
            "true",
            "--dtype",
            "bf16",
            "--json",
            "--plot",
            plot,
        ],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    for (row, context) in rows.iter().zip([128, 512]) {
        assert_eq!(row["context"], context, "{row}");
        assert_eq!(
            (row["device"].as_str(), row["dtype"].as_str()),
            (Some("cpu"), Some("bf16"))
        );
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["peak_rss_mb"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["peak_device_mb"].is_null(), "{row}");
    }
    let png = std::fs::read(plot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}
