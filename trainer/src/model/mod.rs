//! The VILA-shaped model: a SigLIP-like vision tower, VILA's `mlp_downsample`
//! projector and a Qwen2-like decoder, built from plain tensor ops so that
//! every layer has gradients on every backend.
//!
//! Parameters live in a [`VarMap`] under Hugging Face names
//! (`vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `mm_projector.layers.1.weight`, `llm.model.layers.0.mlp.gate_proj.weight`,
//! ...) so that a checkpoint is a plain safetensors file and real SigLIP and
//! Qwen2 weights can be mapped in later.
//!
//! A packed row holds several samples: position ids restart at each sample
//! and attention is causal within a sample only (a block-diagonal mask).
//! Each `<image>` placeholder is replaced by the projector's tokens for its
//! image, so the sequence the decoder sees is longer than the token ids.

mod config;
mod init;
mod layers;
mod projector;
mod qwen2;
mod recompute;
mod rope;
mod siglip;
mod vila;

pub use config::{
    Activation, Config, FieldError, Fields, InitConfig, ProjectorConfig, Qwen2Config, RopeScaling,
    SelectFeature, SiglipVisionConfig,
};
pub use init::init_seeded;
pub(crate) use vila::HEAD_CHUNK;
pub use vila::{Generated, Model, Sampling};

/// One packed row as the model takes it.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub input_ids: &'a [u32],
    pub loss_mask: &'a [u8],
    /// Sample boundaries as cumulative offsets into `input_ids` (0 first).
    pub boundaries: &'a [u32],
    /// `[num_media, 3, S, S]` normalized pixels, one image per placeholder.
    pub pixels: &'a [f32],
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use std::collections::BTreeMap;

    pub(crate) fn tiny() -> Config {
        Config {
            llm: Qwen2Config {
                vocab_size: 40,
                hidden_size: 16,
                intermediate_size: 24,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 1024,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                rope_scaling: None,
                tie_word_embeddings: false,
                partial_rotary_factor: 1.0,
            },
            vision: Some(SiglipVisionConfig {
                hidden_size: 8,
                intermediate_size: 32,
                num_hidden_layers: 1,
                num_attention_heads: 2,
                image_size: 12,
                patch_size: 4,
                hidden_act: Activation::GeluTanh,
                layer_norm_eps: 1e-6,
            }),
            projector: ProjectorConfig { downsample: 2 },
            mm_vision_select_layer: -1,
            mm_vision_select_feature: SelectFeature::ClsPatch,
            image_token: 39,
            init: InitConfig::default(),
        }
    }

    #[test]
    fn projector_token_count_is_ceil_half_grid_squared() {
        let device = Device::Cpu;
        // A 3x3 grid (odd) pads to 4x4 and becomes 2x2 = 4 tokens.
        let config = tiny();
        assert_eq!(config.tokens_per_media(), 4);
        let vars = VarMap::new();
        let model = Model::new(config.clone(), &vars, &device).unwrap();
        let px = Tensor::zeros((2, 3, 12, 12), DType::F32, &device).unwrap();
        let out = model.project(&model.encode_images(&px).unwrap()).unwrap();
        assert_eq!(out.dims(), &[2, 4, 16]);
        assert_eq!(
            config.tokens_per_media(),
            crate::tokens_per_media((config.grid() * config.grid()) as u32) as usize
        );
    }

    /// Deterministic parameter values (VarMap initializes from the thread
    /// RNG): norms near 1, everything else small.
    pub(crate) fn seed_vars(vars: &VarMap, seed: u64) {
        let data = vars.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut state = seed;
        for name in names {
            let var = &data[name];
            let n = var.as_tensor().elem_count();
            let norm = name.contains("norm") && name.ends_with("weight");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    if norm { 1.0 + 0.1 * u } else { 0.2 * u }
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn sample(rng: &mut u64, len: usize, media: bool) -> (Vec<u32>, Vec<u8>) {
        let mut next = || {
            *rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*rng >> 33) as u32
        };
        let mut ids: Vec<u32> = (0..len).map(|_| next() % 38).collect();
        if media {
            ids[1] = 39;
        }
        let mask = (0..len).map(|i| u8::from(i > len / 2)).collect();
        (ids, mask)
    }

    #[test]
    fn a_packed_row_gives_the_same_per_sample_losses_as_samples_alone() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let model = Model::new(tiny(), &vars, &device).unwrap();
        seed_vars(&vars, 5);
        let mut rng = 7;
        let samples = [
            sample(&mut rng, 9, true),
            sample(&mut rng, 6, false),
            sample(&mut rng, 11, true),
        ];
        let pixel_len = 3 * 12 * 12;
        let pixels: Vec<f32> = (0..2 * pixel_len)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        // Alone.
        let mut alone = Vec::new();
        let mut media_at = 0;
        for (ids, mask) in &samples {
            let n = ids.iter().filter(|&&t| t == 39).count();
            let row = Row {
                input_ids: ids,
                loss_mask: mask,
                boundaries: &[0, ids.len() as u32],
                pixels: &pixels[media_at * pixel_len..(media_at + n) * pixel_len],
            };
            media_at += n;
            let (_, _, per) = model.row_loss(&row, &device).unwrap();
            alone.push(per[0].to_scalar::<f32>().unwrap());
        }
        // Packed.
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut bounds = vec![0u32];
        for (i, m) in &samples {
            ids.extend_from_slice(i);
            mask.extend_from_slice(m);
            bounds.push(ids.len() as u32);
        }
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &bounds,
            pixels: &pixels,
        };
        let (total, count, per) = model.row_loss(&row, &device).unwrap();
        for (a, p) in alone.iter().zip(&per) {
            let p = p.to_scalar::<f32>().unwrap();
            assert!(
                (a - p).abs() < 1e-4 * a.abs().max(1.0),
                "alone {a} vs packed {p}"
            );
        }
        assert!((total.to_scalar::<f32>().unwrap() - alone.iter().sum::<f32>()).abs() < 1e-3);
        assert!(count > 0.0);
    }

    #[test]
    fn initializer_range_and_init_std_draw_the_llm_matrices_from_normals() {
        let device = Device::Cpu;
        let std_of = |vars: &VarMap, name: &str| -> (f64, f64) {
            let data = vars.data().lock().unwrap();
            let v: Vec<f32> = data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
            let var = v
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / n;
            let max = v.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
            (var.sqrt(), max)
        };
        let mut config = tiny();
        config.llm.hidden_size = 64;
        config.llm.intermediate_size = 96;
        let uniform_std = 1.0 / (64f64).sqrt() / 3f64.sqrt();
        for range in [None, Some(0.02)] {
            config.init.initializer_range = range;
            let vars = VarMap::new();
            Model::new(config.clone(), &vars, &device).unwrap();
            init_seeded(&vars, 3, &config).unwrap();
            for name in [
                "llm.model.layers.0.self_attn.q_proj.weight",
                "llm.model.layers.1.mlp.gate_proj.weight",
                "llm.lm_head.weight",
            ] {
                let (std, max) = std_of(&vars, name);
                let want = range.unwrap_or(uniform_std);
                assert!(
                    (std / want - 1.0).abs() < 0.1,
                    "{name}: std {std}, want {want}"
                );
                if range.is_none() {
                    assert!(max <= 1.0 / 8.0, "{name}: {max} beyond the uniform bound");
                }
            }
            let (std, _) = std_of(&vars, "llm.model.embed_tokens.weight");
            assert!((std / 0.02 - 1.0).abs() < 0.15, "embedding std {std}");
            // The vision tower keeps its own initialization.
            let (_, max) = std_of(
                &vars,
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            );
            assert!(max <= 1.0 / 8f64.sqrt(), "vision fc1 {max}");
        }
        // `init_std` sets the modules it names; the others keep the range.
        config.init.initializer_range = Some(0.02);
        config.init.init_std =
            BTreeMap::from([("embed_tokens".into(), 0.05), ("q_proj".into(), 0.01)]);
        let vars = VarMap::new();
        Model::new(config.clone(), &vars, &device).unwrap();
        init_seeded(&vars, 3, &config).unwrap();
        for (name, want) in [
            ("llm.model.embed_tokens.weight", 0.05),
            ("llm.model.layers.1.self_attn.q_proj.weight", 0.01),
            ("llm.model.layers.1.self_attn.k_proj.weight", 0.02),
            ("llm.lm_head.weight", 0.02),
        ] {
            let (std, _) = std_of(&vars, name);
            assert!(
                (std / want - 1.0).abs() < 0.1,
                "{name}: std {std}, want {want}"
            );
        }
    }

    /// Central finite differences of the loss against autograd, for a few
    /// coordinates of every parameter tensor.
    #[test]
    fn gradients_match_finite_differences_in_every_layer() {
        check_gradients(false);
    }

    /// The loss and every parameter's gradient of `row`, with or without
    /// activation checkpointing.
    fn loss_and_gradients(
        model: &mut Model,
        vars: &VarMap,
        row: &Row,
        checkpointing: bool,
    ) -> (f32, BTreeMap<String, Vec<f32>>) {
        model.set_gradient_checkpointing(checkpointing);
        let (sum, _, _) = model.row_loss(row, &Device::Cpu).unwrap();
        let mut grads = sum.backward().unwrap();
        model.merge_recomputed(&mut grads).unwrap();
        let data = vars.data().lock().unwrap();
        let mut out = BTreeMap::new();
        for (name, var) in data.iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                out.insert(name.clone(), g.flatten_all().unwrap().to_vec1().unwrap());
            }
        }
        (sum.to_scalar::<f32>().unwrap(), out)
    }

    /// Checkpointing changes what is kept, not what is computed: the same
    /// loss, and the same gradient for every parameter (to `tolerance` of
    /// each gradient's largest value). Returns the gradients' names.
    fn check_checkpointing(
        model: &mut Model,
        vars: &VarMap,
        row: &Row,
        tolerance: f32,
    ) -> Vec<String> {
        let (plain_loss, plain) = loss_and_gradients(model, vars, row, false);
        let (loss, checkpointed) = loss_and_gradients(model, vars, row, true);
        assert!(
            (loss - plain_loss).abs() <= 1e-6 * plain_loss.abs(),
            "{loss} {plain_loss}"
        );
        assert_eq!(
            plain.keys().collect::<Vec<_>>(),
            checkpointed.keys().collect::<Vec<_>>()
        );
        for (name, g) in &plain {
            let top = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = g
                .iter()
                .zip(&checkpointed[name])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= tolerance * top.max(1e-12),
                "{name}: {diff} of {top}"
            );
        }
        plain.into_keys().collect()
    }

    /// Over two decoder layers, a vision block and LoRA adapters.
    #[test]
    fn checkpointed_blocks_give_the_same_loss_and_gradients() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let mut model = Model::new(tiny(), &vars, &device).unwrap();
        model.attach_lora(&vars, 2, 4.0, 5).unwrap();
        seed_vars(&vars, 17);
        let mut rng = 9;
        let (a, ma) = sample(&mut rng, 10, true);
        let (b, mb) = sample(&mut rng, 7, false);
        let (ids, mask) = ([a, b].concat(), [ma, mb].concat());
        let pixels: Vec<f32> = (0..3 * 12 * 12)
            .map(|i| ((i * 7 % 31) as f32 / 15.0) - 1.0)
            .collect();
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &[0, 10, 17],
            pixels: &pixels,
        };
        let names = check_checkpointing(&mut model, &vars, &row, 1e-6);
        assert!(
            names
                .iter()
                .any(|n| n.contains("vision_tower") && n.contains("layers.0"))
        );
        assert!(names.iter().any(|n| n.contains("lora_A")));
    }

    /// A row longer than the LM head's chunk: its logits are computed a
    /// chunk at a time, and the head's gradient is summed over the chunks.
    #[test]
    fn a_long_row_checkpoints_its_lm_head_in_chunks() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let mut config = tiny();
        config.vision = None;
        let mut model = Model::new(config, &vars, &device).unwrap();
        seed_vars(&vars, 23);
        let n = 2 * vila::HEAD_CHUNK + 100;
        let ids: Vec<u32> = (0..n).map(|i| (i * 7 % 37) as u32).collect();
        let mask = vec![1u8; n];
        let bounds = [0, n as u32];
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &bounds,
            pixels: &[],
        };
        // The head's gradient adds three chunks' products instead of one:
        // the same sum in another order.
        let names = check_checkpointing(&mut model, &vars, &row, 1e-5);
        assert!(names.iter().any(|n| n.contains("embed_tokens")));
    }

    /// With the LM head tied to the token embedding, the embedding's
    /// gradient is the sum of both uses, and there is no LM head weight.
    #[test]
    fn tied_embeddings_get_both_gradients() {
        check_gradients(true);
    }

    fn check_gradients(tie_embeddings: bool) {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let mut config = tiny();
        config.llm.num_hidden_layers = 1;
        config.llm.tie_word_embeddings = tie_embeddings;
        let model = Model::new(config, &vars, &device).unwrap();
        seed_vars(&vars, 11);
        let mut rng = 3;
        let (ids, mask) = sample(&mut rng, 10, true);
        let pixels: Vec<f32> = (0..3 * 12 * 12)
            .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
            .collect();
        let row = Row {
            input_ids: &ids,
            loss_mask: &mask,
            boundaries: &[0, 4, 10],
            pixels: &pixels,
        };
        let loss = |m: &Model| -> f64 {
            let (sum, n, _) = m.row_loss(&row, &device).unwrap();
            f64::from(sum.to_scalar::<f32>().unwrap() / n)
        };
        let (sum, n, _) = model.row_loss(&row, &device).unwrap();
        let grads = (sum / f64::from(n)).unwrap().backward().unwrap();
        let data = vars.data().lock().unwrap();
        assert_eq!(
            data.contains_key("llm.lm_head.weight"),
            !tie_embeddings,
            "an LM head weight exists exactly when untied"
        );
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut checked = 0;
        for name in names {
            let var = &data[name];
            if name.contains("post_layernorm") {
                // VILA takes a layer's hidden state, never the post-LayerNorm.
                assert!(grads.get(var.as_tensor()).is_none(), "{name} is used");
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let flat_g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // The largest-gradient coordinate: the one finite differences resolve best.
            let (idx, &analytic) = flat_g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-3f32;
            let set = |v: f32| {
                let mut changed = values.clone();
                changed[idx] = v;
                var.set(&Tensor::from_vec(changed, var.shape(), &device).unwrap())
                    .unwrap();
            };
            set(values[idx] + eps);
            let up = loss(&model);
            set(values[idx] - eps);
            let down = loss(&model);
            set(values[idx]);
            let numeric = (up - down) / (2.0 * f64::from(eps));
            let err = (numeric - f64::from(analytic)).abs();
            assert!(
                err <= 2e-2 * numeric.abs().max(f64::from(analytic.abs())) + 2e-3,
                "{name}[{idx}]: autograd {analytic}, finite differences {numeric}"
            );
            checked += 1;
        }
        assert!(checked > 30, "{checked} tensors");
    }
}
