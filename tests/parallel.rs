//! Training as a group of processes under OpenMPI's `mpirun` (built with
//! `--features mpi`): a group computes what one process computes.
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;

fn recipe() -> String {
    format!("{}/recipes/tiny.toml", env!("CARGO_MANIFEST_DIR"))
}

/// The tiny recipe's stage-3 mix of the tiny corpus, made once for all the
/// tests of this file.
fn stage_3_mix() -> String {
    static MIX: OnceLock<String> = OnceLock::new();
    MIX.get_or_init(|| {
        let corpus = tiny_corpus();
        let dir = tempfile::tempdir().unwrap().keep();
        let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
        lvpipe_ok(corpus, &build_args(&d("shards"), &[]));
        mix_ok(corpus, &recipe(), "3", &d("shards"), &d("mixes"));
        d("mixes/stage-3")
    })
    .clone()
}

/// `mpirun -n N lvpipe ARGS` in `cwd` ([`common::mpirun`]).
fn mpirun(cwd: &Path, n: usize, args: &[&str]) -> Output {
    mpirun_with(cwd, n, args, &[])
}

fn mpirun_with(cwd: &Path, n: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    common::mpirun()
        .args(["-n", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_lvpipe"))
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .expect("mpirun runs (openmpi-bin)")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(run: &str) -> Vec<f64> {
    std::fs::read_to_string(format!("{run}/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn weights(run: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{run}/model.safetensors"), &Device::Cpu).unwrap()
}

/// Largest `|a - b| / max |b|` over tensors of the same names, but for the
/// key projections' biases: a bias added to every key adds the same number
/// to all of a query's scores, which the softmax cancels, so their exact
/// gradient is zero and what they get is rounding noise, which Adam scales
/// up to full-size steps whose signs depend on the order of every sum.
fn worst_relative(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .filter(|(name, _)| !name.ends_with("k_proj.bias"))
        .map(|(name, x)| {
            let y = &b[name];
            let norm = |t: &Tensor| {
                let sq = t.sqr().unwrap().sum_all().unwrap();
                sq.to_scalar::<f32>().unwrap().sqrt()
            };
            norm(&(x - y).unwrap()) / norm(y).max(1e-12)
        })
        .fold(0.0, f32::max)
}

/// Fails unless `run` has the losses of `reference` within 1e-5 relative at
/// every step and its final weights within 1e-5 ([`worst_relative`]).
fn trains_the_same(reference: &str, run: &str, what: &str) {
    let (a, b) = (losses(reference), losses(run));
    assert_eq!(a.len(), b.len(), "{what}");
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{what}, step {step}: {a} vs {b}"
        );
    }
    let worst = worst_relative(&weights(run), &weights(reference));
    assert!(worst <= 1e-5, "{what}: weights differ by {worst}");
}

fn trainer_state(run: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{run}/trainer_state.json")).unwrap())
        .unwrap()
}

/// `train` of the tiny recipe's stage 3 over `mix` into `out`: six steps, a
/// checkpoint every two.
fn train_args<'a>(recipe: &'a str, mix: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--recipe",
        recipe,
        "--stage",
        "3",
        "--mix",
        mix,
        "--tokenizer",
        "raw/tokenizer.json",
        "--out",
        out,
        "--steps",
        "6",
        "--save-every",
        "2",
    ];
    args.extend(extra);
    args
}

/// Stage 3 of the tiny recipe (global batch 8, images in every row), six
/// steps, as one process and as groups of 2 and 4.
#[test]
fn groups_of_processes_train_what_one_process_trains() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let (recipe, mix) = (recipe(), stage_3_mix());
    let one = d("one");
    lvpipe_ok(corpus, &train_args(&recipe, &mix, &one, &[]));
    assert_eq!(losses(&one).len(), 6);
    for n in [2usize, 4] {
        let run = d(&format!("group-{n}"));
        let out = ok(mpirun(corpus, n, &train_args(&recipe, &mix, &run, &[])));
        // Rank 0 alone reports.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.matches("stage 3 (short-sft): 6 steps").count(),
            1,
            "{stderr}"
        );
        trains_the_same(&one, &run, &format!("{n} ranks"));
        let state = trainer_state(&run);
        assert_eq!(state["world_size"], n, "{state}");
        assert_eq!(state["data_parallel"], n, "{state}");
        // The lineage names each sample's rank: all of them, the same
        // samples as one process trained.
        let ranks: Vec<u32> = read_table(Path::new(&run), "lineage")
            .iter()
            .flat_map(|b| {
                let col = b.column_by_name("rank").unwrap();
                let col = col
                    .as_any()
                    .downcast_ref::<arrow::array::UInt32Array>()
                    .unwrap();
                col.values().to_vec()
            })
            .collect();
        for rank in 0..n as u32 {
            assert!(ranks.contains(&rank), "{n} ranks: no rows of rank {rank}");
        }
        let single_rows: usize = read_table(Path::new(&one), "lineage")
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(ranks.len(), single_rows);
    }
    // A world size that does not divide the global batch: refused at start.
    let out = mpirun(corpus, 3, &train_args(&recipe, &mix, &d("three"), &[]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must divide the global batch 8"), "{err}");
}

/// Rank 0 of two dies after step 3: the group stops (mpirun ends the other
/// rank) instead of waiting; resumed by one process from the step-2
/// checkpoint, the run ends with the losses of an uninterrupted one.
#[test]
fn a_dead_rank_stops_the_group_and_another_world_size_resumes() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let (recipe, mix) = (recipe(), stage_3_mix());
    let (straight, killed) = (d("straight"), d("killed"));
    lvpipe_ok(corpus, &train_args(&recipe, &mix, &straight, &[]));
    let started = Instant::now();
    let out = mpirun(
        corpus,
        2,
        &train_args(&recipe, &mix, &killed, &["--abort-after", "3"]),
    );
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(120));
    let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &killed]);
    assert!(err.contains("resumed after step 2"), "{err}");
    let (a, b) = (losses(&straight), losses(&killed));
    assert_eq!(b.len(), 6);
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {step}: {a} vs {b}");
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{killed}/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 1, "{state}");
}

/// Rank 0 of two hangs after step 3 (alive, making no progress): rank 1
/// gives up waiting in the next exchange after the collective timeout, and
/// the launcher ends the group; the step-2 checkpoint resumes.
#[test]
fn a_stuck_rank_stops_the_group_after_the_collective_timeout() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("stuck").to_str().unwrap().to_string();
    let (recipe, mix) = (recipe(), stage_3_mix());
    let started = Instant::now();
    let out = mpirun_with(
        corpus,
        2,
        &train_args(&recipe, &mix, &run, &["--stall-after", "3"]),
        &[("LVPIPE_COLLECTIVE_TIMEOUT", "5")],
    );
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1 of 2: waited"), "{err}");
    let err = lvpipe_ok_stderr(corpus, &["train", "--resume", &run]);
    assert!(err.contains("resumed after step 2"), "{err}");
}

/// Stage 3 planned for `sequence_parallel = 2`: under 2 processes each row
/// (about 400 positions, images in each) is split over both (Ulysses), under
/// 4 over two groups of two that are data parallel, and both train what one
/// process trains on whole rows.
#[test]
fn rows_split_over_a_sequence_parallel_group_train_what_one_process_trains() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let text = std::fs::read_to_string(recipe()).unwrap().replace(
        "name = \"short-sft\"\n",
        "name = \"short-sft\"\nsequence_parallel = 2\n",
    );
    let sp_recipe = d("sp.toml");
    std::fs::write(&sp_recipe, text).unwrap();
    lvpipe_ok(corpus, &build_args(&d("shards"), &[]));
    mix_ok(corpus, &sp_recipe, "3", &d("shards"), &d("mixes"));
    let mix = d("mixes/stage-3");
    let one = d("one");
    let err = lvpipe_ok_stderr(corpus, &train_args(&sp_recipe, &mix, &one, &[]));
    assert!(err.contains("one process trains whole rows"), "{err}");
    for (n, dp) in [(2usize, 1u64), (4, 2)] {
        let run = d(&format!("sp-{n}"));
        let out = ok(mpirun(corpus, n, &train_args(&sp_recipe, &mix, &run, &[])));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("each row split over 2 ranks"), "{err}");
        trains_the_same(&one, &run, &format!("{n} ranks"));
        let state = trainer_state(&run);
        assert_eq!(
            (
                state["world_size"].as_u64(),
                state["data_parallel"].as_u64(),
                state["sequence_parallel"].as_u64(),
                state["sp_mode"].as_str(),
            ),
            (Some(n as u64), Some(dp), Some(2), Some("ulysses")),
            "{state}"
        );
        // Each sample once in the lineage, as one process trained them.
        let rows = |run: &str| -> usize {
            read_table(Path::new(run), "lineage")
                .iter()
                .map(|b| b.num_rows())
                .sum()
        };
        assert_eq!(rows(&run), rows(&one));
    }
    // Three ranks cannot form groups of two.
    let out = mpirun(corpus, 3, &train_args(&sp_recipe, &mix, &d("three"), &[]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a multiple of 2 ranks"), "{err}");

    // Degree 4, more ranks than the 2 key-value heads (each is sent to the
    // two ranks whose query heads share it): each row in four parts.
    let text = std::fs::read_to_string(&sp_recipe)
        .unwrap()
        .replace("sequence_parallel = 2", "sequence_parallel = 4");
    let sp4_recipe = d("sp4.toml");
    std::fs::write(&sp4_recipe, text).unwrap();
    mix_ok(corpus, &sp4_recipe, "3", &d("shards"), &d("mixes4"));
    let mix4 = d("mixes4/stage-3");
    let (one4, sp4) = (d("one4"), d("sp4"));
    lvpipe_ok(corpus, &train_args(&sp4_recipe, &mix4, &one4, &[]));
    let out = ok(mpirun(
        corpus,
        4,
        &train_args(&sp4_recipe, &mix4, &sp4, &[]),
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("each row split over 4 ranks"));
    trains_the_same(&one4, &sp4, "degree 4");

    // Ring attention: key-value blocks passed around the group, at degrees
    // 2 and 4.
    for degree in [2usize, 4] {
        let text = std::fs::read_to_string(&sp_recipe).unwrap().replace(
            "sequence_parallel = 2",
            &format!("sequence_parallel = {degree}\nsp_mode = \"ring\""),
        );
        let ring_recipe = d(&format!("ring{degree}.toml"));
        std::fs::write(&ring_recipe, text).unwrap();
        let mixes = d(&format!("ring-mixes{degree}"));
        mix_ok(corpus, &ring_recipe, "3", &d("shards"), &mixes);
        let mix = format!("{mixes}/stage-3");
        let (one, run) = (d(&format!("ring-one{degree}")), d(&format!("ring{degree}")));
        lvpipe_ok(corpus, &train_args(&ring_recipe, &mix, &one, &[]));
        let out = ok(mpirun(
            corpus,
            degree,
            &train_args(&ring_recipe, &mix, &run, &[]),
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("each row split over {degree} ranks (ring)")),
            "{err}"
        );
        trains_the_same(&one, &run, &format!("ring of {degree}"));
        assert_eq!(trainer_state(&run)["sp_mode"], "ring");
    }
}
