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
        lvpipe_ok(
            corpus,
            &[
                "mix",
                "--recipe",
                &recipe,
                "--stage",
                stage,
                "--shards",
                &shards,
                "--out",
                &d("mixes"),
            ],
        );
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
