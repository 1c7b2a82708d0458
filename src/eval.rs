//! `lvpipe eval`: what a trained stage can do on the synthetic corpus's
//! held-out set, scored against its known answers.
//!
//! Suites (each an object of `eval.json`, with `accuracy` and `table`):
//! - `vqa`: greedy answers to every question about the held-out images and
//!   clips (`eval/` of `lvpipe synth`), by attribute; chance is one over the
//!   number of answer classes;
//! - `niah_text`: a planted fact ("The secret code of NAME is CODE.") at
//!   depths 0 to 100% of filler documents of several lengths, retrieved by
//!   completing "The secret code of NAME is"; heatmap `niah_text.png`, and
//!   up to 8 wrong answers as generated (`misses`);
//! - `niah_video`: the colour and shape that flash for two seconds in
//!   held-out long videos, per depth and frame policy; heatmap
//!   `niah_video.png`;
//! - `ppl`: perplexity of held-out filler documents by position range
//!   (`accuracy` holds the overall perplexity).
//!
//! Media are prepared as the build and the loader prepare them: resized and
//! padded to the model's square, stored as JPEG, decoded and normalized.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_nn::VarMap;
use lvpipe_pipeline::loader::decode_pixels;
use lvpipe_pipeline::splitmix;
use lvpipe_sharding::synth::{Answers, NEEDLE_NAMES, filler_sentences, needle_fact, needle_prompt};
use lvpipe_sharding::{ChatTokenizer, ImageSettings, Segment, SpecialTokens, process_image};
use lvpipe_trainer::model::Model;
use lvpipe_trainer::run::SavedConfig;
use rayon::prelude::*;
use serde_json::{Value, json};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// A stage's run folder (config.json, model.safetensors, tokenizer.json).
    pub run: PathBuf,
    /// The synthetic corpus (answers.json and its `eval/` media).
    pub data: PathBuf,
    pub suites: Vec<String>,
    pub out: PathBuf,
    /// At most this many questions of each kind (0: all).
    pub limit: usize,
    /// Document lengths (tokens) and depths (0 to 1) of the text needles.
    pub niah_lengths: Vec<usize>,
    pub niah_depths: Vec<f64>,
    /// Needles per (length, depth) cell.
    pub niah_trials: usize,
    /// Frame policies of the video needles (one heatmap column each).
    pub video_frames: Vec<String>,
    /// Frame policy of the clip questions.
    pub clip_frames: String,
}

pub const SUITES: [&str; 4] = ["vqa", "niah_text", "niah_video", "ppl"];

/// `vqa,niah,ppl` -> the suites (`niah` is both needle suites; `all`).
pub fn parse_suites(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let names: Vec<&str> = match s {
            "all" => SUITES.to_vec(),
            "niah" => vec!["niah_text", "niah_video"],
            s if SUITES.contains(&s) => vec![s],
            other => bail!(
                "unknown suite `{other}` (known: {}, niah, all)",
                SUITES.join(", ")
            ),
        };
        for n in names {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    Ok(out)
}

/// A loaded stage: model, tokenizer, device.
pub struct Evaluator {
    model: Model,
    tokenizer: ChatTokenizer,
    device: Device,
    image_size: u32,
    stage: usize,
}

impl Evaluator {
    pub fn load(run: &Path) -> Result<Self> {
        let saved = SavedConfig::load(run)?;
        let tokenizer = ChatTokenizer::load(&run.join("tokenizer.json"))?;
        if tokenizer.fingerprint() != saved.tokenizer_fingerprint {
            bail!(
                "{}: tokenizer.json is not the one the run trained with",
                run.display()
            );
        }
        let device = Device::Cpu;
        let mut vars = VarMap::new();
        let model = Model::new(saved.model.clone(), &vars, &device)?;
        let weights = run.join("model.safetensors");
        vars.load(&weights)
            .with_context(|| format!("loading {}", weights.display()))?;
        Ok(Evaluator {
            image_size: saved.model.image_size as u32,
            model,
            tokenizer,
            device,
            stage: saved.stage,
        })
    }

    /// The prompt of one question about `media` images, ready to generate.
    fn prompt(&self, media: usize, question: &str) -> Result<Vec<u32>> {
        let content = format!(
            "{}{question}",
            format!("{}\n", SpecialTokens::IMAGE).repeat(media)
        );
        let (mut ids, _) = self.tokenizer.encode_conversation(&[Segment {
            role: "user",
            content,
        }])?;
        ids.extend(
            self.tokenizer
                .encode(&format!("{}assistant\n", SpecialTokens::IM_START))?,
        );
        Ok(ids)
    }

    /// Greedy answer text (up to `<|im_end|>`).
    fn answer(&self, ids: &[u32], pixels: &[f32], max_new: usize) -> Result<String> {
        let end = self.tokenizer.special().im_end;
        let mut out = self
            .model
            .generate(ids, pixels, max_new, &[end], &self.device)?;
        if out.last() == Some(&end) {
            out.pop();
        }
        Ok(self.tokenizer.decode(&out)?)
    }

    fn image_pixels(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = fs_err::read(path)?;
        let settings = ImageSettings {
            size: self.image_size,
            ..ImageSettings::default()
        };
        let jpeg = process_image(&bytes, &settings)
            .map_err(|(_, e)| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(decode_pixels(
            &jpeg.bytes,
            self.image_size,
            &path.display().to_string(),
        )?)
    }

    /// Frames of a video under `policy`, as the build samples them.
    fn video_pixels(&self, path: &Path, policy: &str) -> Result<(usize, Vec<f32>)> {
        use lvpipe_sharding::video::{FramePolicy, Hints, VideoSettings};
        let settings = VideoSettings {
            policy: policy.parse::<FramePolicy>().map_err(anyhow::Error::msg)?,
            ..VideoSettings::default()
        };
        let sampled = lvpipe_sharding::video::sample(path, &settings, Hints::default())
            .map_err(|(_, e)| anyhow::anyhow!("{}: {e}", path.display()))?;
        let image = ImageSettings {
            size: self.image_size,
            ..ImageSettings::default()
        };
        let mut pixels = Vec::new();
        for f in &sampled.frames {
            let jpeg = lvpipe_sharding::media::encode_rgb(f.rgb.clone(), f.width, f.height, &image)
                .map_err(|(_, e)| anyhow::anyhow!("{}: {e}", path.display()))?;
            pixels.extend(decode_pixels(
                &jpeg.bytes,
                self.image_size,
                &path.display().to_string(),
            )?);
        }
        Ok((sampled.frames.len(), pixels))
    }
}

/// Lower case, no article, no final period: "A red circle." -> "red circle".
fn normalize(text: &str) -> String {
    let t = text.trim().trim_end_matches('.').trim().to_lowercase();
    t.strip_prefix("a ").map(str::to_string).unwrap_or(t)
}

fn classes(attribute: &str) -> f64 {
    match attribute {
        "colour" => 6.0,
        "shape" | "count" => 3.0,
        "position" => 5.0,
        "direction" => 2.0,
        _ => 1.0,
    }
}

/// Runs the suites and writes `eval.json` (and heatmaps) into `out`.
pub fn evaluate(s: &EvalSettings, on_suite: &mut dyn FnMut(&str)) -> Result<Value> {
    let ev = Evaluator::load(&s.run)?;
    let answers_path = s.data.join("answers.json");
    let answers: Answers = serde_json::from_str(
        &fs_err::read_to_string(&answers_path)
            .with_context(|| format!("{}: no synthetic answers", s.data.display()))?,
    )
    .with_context(|| answers_path.display().to_string())?;
    fs_err::create_dir_all(&s.out)?;
    let mut report = json!({
        "run": s.run.display().to_string(),
        "stage": ev.stage,
    });
    let take = |n: usize| if s.limit == 0 { n } else { n.min(s.limit) };
    for suite in &s.suites {
        on_suite(suite);
        let value = match suite.as_str() {
            "vqa" => vqa(&ev, s, &answers, take)?,
            "niah_text" => niah_text(&ev, s)?,
            "niah_video" => niah_video(&ev, s, &answers, take)?,
            "ppl" => perplexity(&ev, s)?,
            other => bail!("unknown suite `{other}`"),
        };
        report[suite.as_str()] = value;
    }
    fs_err::write(
        s.out.join("eval.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(report)
}

fn vqa(
    ev: &Evaluator,
    s: &EvalSettings,
    answers: &Answers,
    take: impl Fn(usize) -> usize,
) -> Result<Value> {
    // (modality, attribute, the wrong answer as generated, if wrong)
    let graded = |modality: &'static str, file: &str, question: &str, answer: &str, got: String| {
        let miss = (normalize(&got) != normalize(answer)).then(
            || json!({"file": file, "question": question, "answer": answer, "generated": got}),
        );
        (modality, miss)
    };
    let images = &answers.eval_vqa[..take(answers.eval_vqa.len())];
    let mut results: Vec<(&str, String, Option<Value>)> = images
        .par_iter()
        .map(|q| -> Result<_> {
            let pixels = ev.image_pixels(&s.data.join(&q.image))?;
            let got = ev.answer(&ev.prompt(1, &q.question)?, &pixels, 8)?;
            let (modality, miss) = graded("image", &q.image, &q.question, &q.answer, got);
            Ok((modality, q.attribute.clone(), miss))
        })
        .collect::<Result<_>>()?;
    if cfg!(feature = "video") {
        let clips = &answers.eval_video_vqa[..take(answers.eval_video_vqa.len())];
        let more: Vec<(&str, String, Option<Value>)> = clips
            .par_iter()
            .map(|q| -> Result<_> {
                let (n, pixels) = ev.video_pixels(&s.data.join(&q.video), &s.clip_frames)?;
                let got = ev.answer(&ev.prompt(n, &q.question)?, &pixels, 8)?;
                let (modality, miss) = graded("video", &q.video, &q.question, &q.answer, got);
                Ok((modality, q.attribute.clone(), miss))
            })
            .collect::<Result<_>>()?;
        results.extend(more);
    }
    // A few wrong answers as generated: what the model says instead.
    let misses: Vec<Value> = results.iter().filter_map(|r| r.2.clone()).take(8).collect();
    let results: Vec<(&str, String, bool)> = results
        .into_iter()
        .map(|(m, a, miss)| (m, a, miss.is_none()))
        .collect();
    let mut table = Vec::new();
    let mut keys: Vec<(&str, String)> = results.iter().map(|(m, a, _)| (*m, a.clone())).collect();
    keys.sort();
    keys.dedup();
    for (modality, attribute) in keys {
        let hits = results
            .iter()
            .filter(|(m, a, _)| *m == modality && *a == attribute)
            .map(|r| r.2);
        table.push(scored(
            hits,
            json!({
                "modality": modality,
                "attribute": attribute,
                "chance": 1.0 / classes(&attribute),
            }),
        ));
    }
    let n = results.len().max(1) as f64;
    Ok(json!({
        "accuracy": accuracy(results.iter().map(|r| r.2)),
        "chance": results.iter().map(|r| 1.0 / classes(&r.1)).sum::<f64>() / n,
        "n": results.len(),
        "table": table,
        "misses": misses,
    }))
}

/// Share of true answers (0 for none).
fn accuracy(hits: impl IntoIterator<Item = bool>) -> f64 {
    let (n, correct) = hits.into_iter().fold((0usize, 0usize), |(n, c), hit| {
        (n + 1, c + usize::from(hit))
    });
    correct as f64 / n.max(1) as f64
}

/// A table row: `fields` with `n`, `correct` and `accuracy` of the hits.
fn scored(hits: impl IntoIterator<Item = bool>, mut fields: Value) -> Value {
    let hits: Vec<bool> = hits.into_iter().collect();
    fields["n"] = json!(hits.len());
    fields["correct"] = json!(hits.iter().filter(|h| **h).count());
    fields["accuracy"] = json!(accuracy(hits));
    fields
}

/// A filler document of about `tokens` tokens with `fact` at `depth`,
/// ending with `tail`; from `seed`.
fn haystack(
    ev: &Evaluator,
    seed: u64,
    tokens: usize,
    fact: &str,
    depth: f64,
    tail: &str,
) -> Result<Vec<u32>> {
    let reserve = ev.tokenizer.encode(fact)?.len() + ev.tokenizer.encode(tail)?.len() + 2;
    let budget = tokens.saturating_sub(reserve);
    let mut sentences = Vec::new();
    let mut used = 0;
    for sentence in filler_sentences(seed, tokens) {
        let n = ev.tokenizer.encode(&format!(" {sentence}"))?.len();
        if used + n > budget {
            break;
        }
        used += n;
        sentences.push(sentence);
    }
    let at = ((sentences.len() as f64) * depth).round() as usize;
    sentences.insert(at.min(sentences.len()), fact.to_string());
    let mut text = sentences.join(" ");
    text.push(' ');
    text.push_str(tail);
    Ok(ev.tokenizer.encode(&text)?)
}

fn niah_text(ev: &Evaluator, s: &EvalSettings) -> Result<Value> {
    let mut cells = Vec::new();
    for &length in &s.niah_lengths {
        for &depth in &s.niah_depths {
            for trial in 0..s.niah_trials {
                cells.push((length, depth, trial));
            }
        }
    }
    let results = cells
        .par_iter()
        .map(|&(length, depth, trial)| -> Result<_> {
            let key =
                splitmix(length as u64 * 1_000_003 + (depth * 1000.0) as u64 * 7919 + trial as u64);
            let name = format!("{}{}", NEEDLE_NAMES[(key % 16) as usize], 9000 + key % 1000);
            let code = (1000 + (key >> 20) % 9000).to_string();
            let ids = haystack(
                ev,
                key,
                length,
                &needle_fact(&name, &code),
                depth,
                &needle_prompt(&name),
            )?;
            let out = ev.model.generate(&ids, &[], 6, &[], &ev.device)?;
            let text = ev.tokenizer.decode(&out)?;
            let digits: String = text
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            let miss = (digits != code).then(
                || json!({"length": length, "depth": depth, "answer": code, "generated": text}),
            );
            Ok((length, depth, miss))
        })
        .collect::<Result<Vec<_>>>()?;
    // A few wrong answers as generated: what the model does instead.
    let misses: Vec<Value> = results.iter().filter_map(|r| r.2.clone()).take(8).collect();
    let results: Vec<(usize, f64, bool)> = results
        .into_iter()
        .map(|(l, d, miss)| (l, d, miss.is_none()))
        .collect();
    let mut table = Vec::new();
    for &length in &s.niah_lengths {
        for &depth in &s.niah_depths {
            let hits = results
                .iter()
                .filter(|r| r.0 == length && r.1 == depth)
                .map(|r| r.2);
            table.push(scored(hits, json!({"length": length, "depth": depth})));
        }
    }
    let by_length: Vec<Value> = s
        .niah_lengths
        .iter()
        .map(|&l| {
            let hits = results.iter().filter(|r| r.0 == l).map(|r| r.2);
            json!({"length": l, "accuracy": accuracy(hits)})
        })
        .collect();
    heatmap_of(
        &s.out.join("niah_text.png"),
        &format!("Text needle retrieval, stage {}", ev.stage),
        &table,
        "depth",
        "length",
    )?;
    Ok(json!({
        "accuracy": accuracy(results.iter().map(|r| r.2)),
        "by_length": by_length,
        "table": table,
        "misses": misses,
    }))
}

fn niah_video(
    ev: &Evaluator,
    s: &EvalSettings,
    answers: &Answers,
    take: impl Fn(usize) -> usize,
) -> Result<Value> {
    if !cfg!(feature = "video") {
        return Ok(
            json!({"accuracy": null, "table": [], "skipped": "built without the video feature"}),
        );
    }
    let needles = &answers.eval_video_needles[..take(answers.eval_video_needles.len())];
    let jobs: Vec<(&lvpipe_sharding::synth::VideoNeedle, &String)> = needles
        .iter()
        .flat_map(|n| s.video_frames.iter().map(move |p| (n, p)))
        .collect();
    let results: Vec<(f64, String, bool, usize)> = jobs
        .par_iter()
        .map(|(needle, policy)| -> Result<_> {
            let (n, pixels) = ev.video_pixels(&s.data.join(&needle.video), policy)?;
            let got = ev.answer(&ev.prompt(n, &needle.question)?, &pixels, 8)?;
            Ok((
                needle.depth,
                (*policy).clone(),
                normalize(&got) == normalize(&needle.answer),
                n,
            ))
        })
        .collect::<Result<_>>()?;
    let mut depths: Vec<f64> = needles.iter().map(|n| n.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let mut table = Vec::new();
    for policy in &s.video_frames {
        for &depth in &depths {
            let cell: Vec<&(f64, String, bool, usize)> = results
                .iter()
                .filter(|r| r.0 == depth && &r.1 == policy)
                .collect();
            table.push(scored(
                cell.iter().map(|c| c.2),
                json!({"frames": policy, "depth": depth, "num_frames": cell.first().map(|c| c.3)}),
            ));
        }
    }
    heatmap_of(
        &s.out.join("niah_video.png"),
        &format!("Video needle retrieval, stage {}", ev.stage),
        &table,
        "depth",
        "frames",
    )?;
    Ok(json!({
        "accuracy": accuracy(results.iter().map(|r| r.2)),
        "chance": 1.0 / 18.0,
        "table": table,
    }))
}

fn perplexity(ev: &Evaluator, s: &EvalSettings) -> Result<Value> {
    let longest = s.niah_lengths.iter().copied().max().unwrap_or(2048);
    let docs: Vec<Vec<f32>> = (0..4u64)
        .into_par_iter()
        .map(|k| -> Result<_> {
            let key = splitmix(0x5EED_0000 + k);
            let name = format!("{}{}", NEEDLE_NAMES[(key % 16) as usize], 8000 + k);
            let ids = haystack(
                ev,
                key,
                longest,
                &needle_fact(&name, &(1000 + key % 9000).to_string()),
                0.5,
                "",
            )?;
            Ok(ev.model.token_nll(&ids, &ev.device)?)
        })
        .collect::<Result<_>>()?;
    let mut edges = vec![0usize];
    let mut e = 128;
    while e < longest {
        edges.push(e);
        e *= 2;
    }
    edges.push(longest);
    let mut table = Vec::new();
    for w in edges.windows(2) {
        let vals: Vec<f32> = docs
            .iter()
            .flat_map(|d| d.iter().skip(w[0]).take(w[1] - w[0]).copied())
            .collect();
        if vals.is_empty() {
            continue;
        }
        let mean = vals.iter().map(|v| f64::from(*v)).sum::<f64>() / vals.len() as f64;
        table.push(
            json!({"from": w[0], "to": w[1], "tokens": vals.len(), "perplexity": mean.exp()}),
        );
    }
    let all: Vec<f64> = docs.iter().flatten().map(|v| f64::from(*v)).collect();
    let ppl = (all.iter().sum::<f64>() / all.len().max(1) as f64).exp();
    Ok(json!({"accuracy": ppl, "perplexity": ppl, "documents": docs.len(), "table": table}))
}

/// A heatmap of a suite's table: `accuracy` by `x` (columns) and `y` (rows).
fn heatmap_of(path: &Path, title: &str, table: &[Value], x: &str, y: &str) -> Result<()> {
    let label = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => format!("{:.0}%", n.as_f64().unwrap_or(0.0) * 100.0),
        other => other.to_string(),
    };
    let mut cols: Vec<String> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    for r in table {
        let (c, w) = (label(&r[x]), label(&r[y]));
        if !cols.contains(&c) {
            cols.push(c);
        }
        if !rows.contains(&w) {
            rows.push(w);
        }
    }
    let mut values = vec![vec![f64::NAN; cols.len()]; rows.len()];
    for r in table {
        let c = cols.iter().position(|c| *c == label(&r[x])).unwrap_or(0);
        let w = rows.iter().position(|w| *w == label(&r[y])).unwrap_or(0);
        values[w][c] = r["accuracy"].as_f64().unwrap_or(f64::NAN);
    }
    crate::plot::heatmap(path, title, &format!("{y} / {x}"), &rows, &cols, &values)
}

/// One line per suite, for the terminal and the demo report.
pub fn summary(report: &Value) -> String {
    let mut text = String::new();
    for suite in SUITES {
        let v = &report[suite];
        if v.is_null() {
            continue;
        }
        let line = match suite {
            "ppl" => format!("ppl: {:.2}\n", v["perplexity"].as_f64().unwrap_or(f64::NAN)),
            _ => {
                let acc = v["accuracy"].as_f64().unwrap_or(f64::NAN);
                let chance = v["chance"]
                    .as_f64()
                    .map(|c| format!(" (chance {:.1}%)", c * 100.0))
                    .unwrap_or_default();
                format!("{suite}: {:.1}%{chance}\n", acc * 100.0)
            }
        };
        text.push_str(&line);
    }
    text
}
