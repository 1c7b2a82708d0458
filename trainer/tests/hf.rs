//! Hugging Face and VILA folders against the outputs `transformers` computed
//! for them (fixtures/hf, made by benches/tools/hf_fixtures.py): loading,
//! logits, vision features, greedy decoding, export round trips, and the
//! errors bad checkpoints give.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lvpipe_trainer::hf::{self, ExportFormat};
use lvpipe_trainer::model::{Config, Model};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/hf")
        .join(name)
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The model a folder describes, its weights loaded.
fn load(dir: &Path, image_token: Option<u32>) -> (Model, Config) {
    let folder = hf::open(dir).unwrap();
    let config = folder.config(image_token).unwrap();
    let vars = VarMap::new();
    let model = Model::new(config.clone(), &vars, &Device::Cpu).unwrap();
    hf::load_into(&vars, &folder).unwrap();
    (model, config)
}

fn assert_close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: largest difference {worst} > {tol}");
}

fn logits(model: &Model, ids: &[u32], pixels: &[f32]) -> Vec<f32> {
    model
        .logits(ids, pixels, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn qwen2_folders_give_transformers_logits_and_greedy_tokens() {
    // Sharded f32 with grouped-query heads and linear RoPE scaling; one file
    // of bf16 weights with tied embeddings and transformers 5's rope_parameters.
    // YaRN and dynamic NTK rope_scaling, as transformers computes them.
    for name in ["qwen2-gqa", "qwen2-tied", "qwen2-yarn", "qwen2-dynamic"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let (model, config) = load(&dir, None);
        assert!(config.vision.is_none());
        let prompt = ids(&r["input_ids"]);
        assert_close(
            &logits(&model, &prompt, &[]),
            &floats(&r["logits"]),
            1e-4,
            name,
        );
        let greedy = model.generate(&prompt, &[], 12, &[], &Device::Cpu).unwrap();
        assert_eq!(greedy, ids(&r["greedy"]), "{name}: greedy tokens");
    }
}

#[test]
fn a_vila_folder_gives_vilas_projected_tokens_and_logits() {
    let dir = fixture("vila");
    let r = reference(&dir);
    let image_token = 95;
    let (model, config) = load(&dir, Some(image_token));
    assert_eq!(config.mm_vision_select_layer, -2);
    let pixels = floats(&r["pixels"]);
    let px = Tensor::from_slice(&pixels, (1, 3, 35, 35), &Device::Cpu).unwrap();
    let projected: Vec<f32> = model
        .project(&model.encode_images(&px).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // A 5x5 grid: padded to 6x6, merged into 3x3 tokens in flat_square order.
    assert_close(
        &projected,
        &floats(&r["projected"]),
        1e-4,
        "projected tokens",
    );
    let mut prompt = ids(&r["before"]);
    prompt.push(image_token);
    prompt.extend(ids(&r["after"]));
    assert_close(
        &logits(&model, &prompt, &pixels),
        &floats(&r["logits"]),
        1e-4,
        "logits",
    );
}

#[test]
fn every_selected_vision_layer_matches_the_siglip_hidden_state() {
    let r = reference(&fixture("siglip"));
    let folder = hf::open(&fixture("vila")).unwrap();
    let pixels = floats(&r["pixels"]);
    let px = Tensor::from_slice(&pixels, (1, 3, 35, 35), &Device::Cpu).unwrap();
    let states = r["hidden_states"].as_array().unwrap();
    for (select, state) in [(0, 0), (1, 1), (-2, 2), (-1, 3)] {
        let mut config = folder.config(Some(95)).unwrap();
        config.mm_vision_select_layer = select;
        let vars = VarMap::new();
        let model = Model::new(config, &vars, &Device::Cpu).unwrap();
        hf::load_into(&vars, &folder).unwrap();
        let ours: Vec<f32> = model
            .encode_images(&px)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close(
            &ours,
            &floats(&states[state]),
            1e-4,
            &format!("layer {select}"),
        );
    }
}

#[test]
fn exports_load_back_with_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, format, image_token) in [
        ("qwen2-gqa", ExportFormat::Hf, None),
        ("qwen2-tied", ExportFormat::Hf, None),
        ("vila", ExportFormat::Vila, Some(95)),
    ] {
        let out = tmp.path().join(name);
        hf::export(&fixture(name), format, &out).unwrap();
        let (a, _) = load(&fixture(name), image_token);
        let (b, _) = load(&out, image_token);
        let r = reference(&fixture(name));
        let (prompt, pixels) = match image_token {
            None => (ids(&r["input_ids"]), vec![]),
            Some(t) => {
                let mut p = ids(&r["before"]);
                p.push(t);
                p.extend(ids(&r["after"]));
                (p, floats(&r["pixels"]))
            }
        };
        assert_close(
            &logits(&a, &prompt, &pixels),
            &logits(&b, &prompt, &pixels),
            0.0,
            name,
        );
        // Exporting into a folder that has files is refused.
        let err = hf::export(&fixture(name), format, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not empty"), "{err}");
    }
    // transformers loads what lvpipe exports, where it is installed
    // (LVPIPE_REFERENCE_PYTHON: a Python with torch and transformers).
    if let Ok(python) = std::env::var("LVPIPE_REFERENCE_PYTHON") {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/tools/check_export.py");
        for name in ["qwen2-gqa", "qwen2-tied"] {
            let status = std::process::Command::new(&python)
                .arg(&script)
                .arg(tmp.path().join(name))
                .arg(fixture(name).join("reference.json"))
                .status()
                .unwrap();
            assert!(status.success(), "transformers on the {name} export");
        }
    }
}

/// A copy of a fixture folder to damage.
fn copy(name: &str, to: &Path) -> PathBuf {
    let dir = to.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// The error loading `dir` into the model of the intact fixture gives.
fn load_error(dir: &Path) -> String {
    let folder = match hf::open(dir) {
        Ok(f) => f,
        Err(e) => return e.to_string(),
    };
    let config = hf::open(&fixture("qwen2-tied"))
        .unwrap()
        .config(None)
        .unwrap();
    let vars = VarMap::new();
    Model::new(config, &vars, &Device::Cpu).unwrap();
    hf::load_into(&vars, &folder).unwrap_err().to_string()
}

fn rewrite(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

#[test]
fn bad_checkpoints_name_the_file_and_every_tensor_or_field() {
    let tmp = tempfile::tempdir().unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";

    let dir = copy("qwen2-tied", &tmp.path().join("missing"));
    rewrite(&dir, |t| {
        t.remove(q);
        t.remove("model.norm.weight");
    });
    let err = load_error(&dir);
    assert!(err.contains("2 problems"), "{err}");
    assert!(
        err.contains(&format!("missing `llm.{q}` [32, 32]")),
        "{err}"
    );
    assert!(
        err.contains("missing `llm.model.norm.weight` [32]"),
        "{err}"
    );

    let dir = copy("qwen2-tied", &tmp.path().join("shape"));
    rewrite(&dir, |t| {
        t.insert(
            q.into(),
            Tensor::zeros((32, 30), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "model.extra.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains(&format!(
            "`llm.{q}`: expected shape [32, 32], found [32, 30]"
        )),
        "{err}"
    );
    assert!(
        err.contains("unexpected `llm.model.extra.weight` [3]"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");

    let dir = copy("qwen2-tied", &tmp.path().join("dtype"));
    rewrite(&dir, |t| {
        t.insert(
            q.into(),
            Tensor::zeros((32, 32), DType::I64, &Device::Cpu).unwrap(),
        );
    });
    let err = load_error(&dir);
    assert!(err.contains(q) && err.contains("I64"), "{err}");

    let dir = copy("qwen2-tied", &tmp.path().join("truncated"));
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not a readable safetensors"),
        "{err}"
    );

    let dir = copy("qwen2-tied", &tmp.path().join("field"));
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": \"2\""),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("`num_hidden_layers`"),
        "{err}"
    );

    let dir = copy("qwen2-gqa", &tmp.path().join("lost-shard"));
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}

#[test]
fn a_smaller_vocabulary_grows_by_mean_rows() {
    let dir = fixture("qwen2-tied");
    let folder = hf::open(&dir).unwrap();
    let mut config = folder.config(None).unwrap();
    config.llm.vocab_size += 2;
    let vars = VarMap::new();
    let model = Model::new(config, &vars, &Device::Cpu).unwrap();
    hf::load_into(&vars, &folder).unwrap();
    let embed = vars.data().lock().unwrap()["llm.model.embed_tokens.weight"]
        .as_tensor()
        .clone();
    let mean: Vec<f32> = embed
        .narrow(0, 0, 96)
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let new: Vec<f32> = embed.get(97).unwrap().to_vec1().unwrap();
    assert_close(&new, &mean, 1e-6, "new row");
    // The old tokens' logits are unchanged.
    let r = reference(&dir);
    let all = model
        .logits(&ids(&r["input_ids"]), &[], &Device::Cpu)
        .unwrap();
    let old: Vec<f32> = all
        .narrow(1, 0, 96)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_close(&old, &floats(&r["logits"]), 1e-4, "old logits");
}
