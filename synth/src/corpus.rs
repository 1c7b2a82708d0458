//! The corpus, one writer per source file. The writers draw from one random
//! stream in a fixed order (notes and the code catalogue from their own), so
//! the same seed gives the same bytes.

use std::path::{Path, PathBuf};

use image::ImageFormat;
use lvpipe_schemas::{Registry, RegistryEntry, SourceKind, tokens};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::answers::{Answers, Needle, VqaItem};
use crate::formats::{
    LlavaRecord, LlavaTurn, Mmc4Image, Mmc4Record, TextRecord, json_array, json_lines, qa_turns,
    tar,
};
use crate::scene::{Scene, capitalize, encode, image_dims};
use crate::text::{Catalogue, NAMES, filler_sentence, ledger_note, needle_fact, roster_note};
use crate::{Result, SOURCES, Sizes, SynthSettings, SynthSummary, VIDEO_SOURCES};

/// What the writers share: where they write, how much, the corpus's random
/// stream, and what has been written so far.
struct Corpus<'a> {
    out: &'a Path,
    sizes: &'a Sizes,
    rng: SmallRng,
    files: Vec<PathBuf>,
    /// Every piece of text the tokenizer is trained on.
    text: Vec<String>,
    answers: Answers,
}

impl Corpus<'_> {
    /// Writes `bytes` to `out/name`.
    fn file(&mut self, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
        let path = self.out.join(name);
        fs_err::write(&path, bytes)?;
        self.files.push(path);
        Ok(())
    }

    /// Renders `scene` into `images/NAME.png` (even `i`) or `.jpg` (odd).
    fn image(&mut self, name: &str, scene: &Scene, i: usize) -> Result<String> {
        let (w, h) = image_dims(&mut self.rng, self.sizes.image_side);
        let (ext, format) = if i.is_multiple_of(2) {
            ("png", ImageFormat::Png)
        } else {
            ("jpg", ImageFormat::Jpeg)
        };
        let rel = format!("images/{name}.{ext}");
        let bytes = encode(&scene.render(&mut self.rng, w, h), format)?;
        self.file(&rel, bytes)?;
        Ok(rel)
    }

    fn count(&mut self, source: &str, kind: &str, samples: usize) {
        let answers = &mut self.answers;
        answers.counts.insert(source.to_string(), samples as u64);
        answers.kinds.insert(source.to_string(), kind.to_string());
    }
}

/// Writes the whole corpus (see the crate docs).
pub(crate) fn write(settings: &SynthSettings) -> Result<SynthSummary> {
    let sizes = settings.scale.sizes();
    fs_err::create_dir_all(settings.out.join("images"))?;
    let mut c = Corpus {
        out: &settings.out,
        sizes: &sizes,
        rng: SmallRng::seed_from_u64(settings.seed),
        files: Vec::new(),
        text: Vec::new(),
        answers: Answers {
            seed: settings.seed,
            scale: format!("{:?}", settings.scale).to_lowercase(),
            ..Answers::default()
        },
    };
    pretrain(&mut c)?;
    sft(&mut c)?;
    pairs(&mut c)?;
    interleaved(&mut c)?;
    let catalogue = Catalogue::new(settings.seed, sizes.catalogue);
    longdocs(&mut c, &catalogue)?;
    notes(&mut c, settings.seed, &catalogue)?;
    eval_images(&mut c)?;
    #[cfg(feature = "video")]
    videos(&mut c)?;
    let path = settings.out.join("tokenizer.json");
    crate::train_tokenizer(&c.text, sizes.vocab, &path)?;
    c.files.push(path);
    c.file("registry.toml", registry().to_toml()?)?;
    let answers = serde_json::to_string_pretty(&c.answers).expect("answers serialize") + "\n";
    c.file(Answers::FILE_NAME, answers)?;
    let bytes = c
        .files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(SynthSummary {
        files: c.files.len(),
        answers: c.answers,
        bytes,
    })
}

/// Stage-1 style pairs: LLaVA pretrain JSON.
fn pretrain(c: &mut Corpus) -> Result<()> {
    let mut records = Vec::new();
    for i in 0..c.sizes.pretrain {
        let scene = Scene::random(&mut c.rng);
        let id = format!("pretrain-{i:05}");
        let image = c.image(&id, &scene, i)?;
        let caption = scene.caption(&mut c.rng);
        c.text.push(caption.clone());
        c.answers.images.push(scene.facts(image.clone()));
        records.push(LlavaRecord {
            id,
            image,
            conversations: vec![
                LlavaTurn {
                    from: "human",
                    value: format!("{}\nDescribe the image briefly.", tokens::IMAGE),
                },
                LlavaTurn {
                    from: "gpt",
                    value: caption,
                },
            ],
        });
    }
    c.count("pretrain", "image_text", records.len());
    c.file("pretrain.json", json_array(&records))
}

/// Multi-turn VQA: LLaVA SFT JSON, two or three of each image's four
/// questions in a random order.
fn sft(c: &mut Corpus) -> Result<()> {
    let mut records = Vec::new();
    for i in 0..c.sizes.sft {
        let scene = Scene::random(&mut c.rng);
        let id = format!("sft-{i:05}");
        let image = c.image(&id, &scene, i + 1)?;
        c.answers.images.push(scene.facts(image.clone()));
        let mut qas = scene.questions();
        for k in (1..qas.len()).rev() {
            qas.swap(k, c.rng.random_range(0..=k));
        }
        qas.truncate(c.rng.random_range(2..=3));
        let conversations = qa_turns(tokens::IMAGE, &qas);
        for (attribute, question, answer) in qas {
            c.text.push(format!("{question} {}.", capitalize(&answer)));
            c.answers.vqa.push(VqaItem {
                id: id.clone(),
                image: image.clone(),
                attribute: attribute.to_string(),
                question,
                answer,
            });
        }
        records.push(LlavaRecord {
            id,
            image,
            conversations,
        });
    }
    c.count("sft", "image_text", records.len());
    c.file("sft.json", json_array(&records))
}

/// WebDataset pairs: `KEY.jpg` + `KEY.txt` in one tar.
fn pairs(c: &mut Corpus) -> Result<()> {
    let mut members = Vec::new();
    for i in 0..c.sizes.wds {
        let scene = Scene::random(&mut c.rng);
        let (w, h) = image_dims(&mut c.rng, c.sizes.image_side);
        let jpg = encode(&scene.render(&mut c.rng, w, h), ImageFormat::Jpeg)?;
        let caption = scene.caption(&mut c.rng);
        c.text.push(caption.clone());
        let key = format!("{i:06}");
        c.answers
            .images
            .push(scene.facts(format!("pairs-000.tar!{key}.jpg")));
        members.push((format!("{key}.jpg"), jpg));
        members.push((format!("{key}.txt"), caption.into_bytes()));
    }
    c.count("pairs-000", "image_text", c.sizes.wds);
    let bytes = tar(members)?;
    c.file("pairs-000.tar", bytes)
}

/// Interleaved documents: paragraphs with the images they describe.
fn interleaved(c: &mut Corpus) -> Result<()> {
    let mut records = Vec::new();
    for i in 0..c.sizes.interleaved {
        let id = format!("doc-{i:05}");
        let mut text_list = vec![format!(
            "{} {}",
            filler_sentence(&mut c.rng),
            filler_sentence(&mut c.rng)
        )];
        let mut image_info = Vec::new();
        for j in 0..c.rng.random_range(1..=3) {
            let scene = Scene::random(&mut c.rng);
            let image = c.image(&format!("{id}-{j}"), &scene, i + j)?;
            c.answers.images.push(scene.facts(image.clone()));
            image_info.push(Mmc4Image {
                image_name: image,
                matched_text_index: text_list.len(),
            });
            text_list.push(format!(
                "{} {}",
                scene.caption(&mut c.rng),
                filler_sentence(&mut c.rng)
            ));
        }
        c.text.extend(text_list.iter().cloned());
        records.push(Mmc4Record {
            url: format!("synth://{id}"),
            id,
            text_list,
            image_info,
        });
    }
    c.count("interleaved", "interleaved", records.len());
    c.file("interleaved.jsonl", json_lines(&records))
}

/// Long documents with one planted fact each, at depths cycling 0 to 1 and
/// recalled at the end, among further facts each recalled later: retrieval
/// across the context is what the long-context stages can learn.
fn longdocs(c: &mut Corpus, catalogue: &Catalogue) -> Result<()> {
    let depths = [0.0, 0.25, 0.5, 0.75, 1.0];
    let mut records = Vec::new();
    for i in 0..c.sizes.longdocs {
        let rng = &mut c.rng;
        let id = format!("long-{i:05}");
        let depth = depths[i % depths.len()];
        let name = format!("{}{}", NAMES.choose(rng).expect("non-empty"), i);
        let code = catalogue.common(rng);
        let target_words = rng.random_range(c.sizes.long_words.0..=c.sizes.long_words.1);
        let mut sentences = Vec::new();
        let mut words = 0;
        while words < target_words {
            let s = filler_sentence(rng);
            words += s.split_whitespace().count();
            sentences.push(s);
        }
        for k in 0..target_words / 150 {
            let other = format!("{}{i}x{k}", NAMES.choose(rng).expect("non-empty"));
            let other_code = catalogue.common(rng);
            let fact = rng.random_range(0..=sentences.len());
            sentences.insert(fact, needle_fact(&other, &other_code));
            let recall = rng.random_range(fact + 1..=sentences.len());
            sentences.insert(recall, needle_fact(&other, &other_code));
        }
        let at = ((sentences.len() as f64) * depth).round() as usize;
        sentences.insert(at.min(sentences.len()), needle_fact(&name, &code));
        sentences.push(needle_fact(&name, &code));
        let text = sentences.join(" ");
        c.text.push(text.clone());
        c.answers.needles.push(Needle {
            id: id.clone(),
            depth,
            question: format!("What is the secret code of {name}?"),
            answer: code,
        });
        records.push(TextRecord { id, text });
    }
    c.count("longdocs", "text", records.len());
    c.file("longdocs.jsonl", json_lines(&records))
}

/// Notes: documents that repeat themselves, as web text does. Copying from
/// context (an induction head) is what the LLM learns from them; LongVILA's
/// Qwen2 arrives with it from pretraining, ours starts random. They draw
/// from their own random stream and stay out of the tokenizer's text, so the
/// rest of the corpus does not depend on them.
fn notes(c: &mut Corpus, seed: u64, catalogue: &Catalogue) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6e6f_7465);
    let (short, long) = c.sizes.notes;
    let mut records = Vec::new();
    for i in 0..short + long {
        let gap = if i < short {
            rng.random_range(0..=3)
        } else {
            rng.random_range(16..=140)
        };
        let text = if rng.random_bool(0.5) {
            ledger_note(&mut rng, gap, catalogue)
        } else {
            roster_note(&mut rng, gap)
        };
        records.push(TextRecord {
            id: format!("note-{i:06}"),
            text,
        });
    }
    c.count("notes", "text", records.len());
    c.file("notes.jsonl", json_lines(&records))
}

/// The held-out evaluation images (`eval/images/`), every question of each.
fn eval_images(c: &mut Corpus) -> Result<()> {
    fs_err::create_dir_all(c.out.join("eval/images"))?;
    for i in 0..c.sizes.eval.0 {
        let scene = Scene::random(&mut c.rng);
        let (w, h) = image_dims(&mut c.rng, c.sizes.image_side);
        let rel = format!("eval/images/eval-{i:05}.png");
        let bytes = encode(&scene.render(&mut c.rng, w, h), ImageFormat::Png)?;
        c.file(&rel, bytes)?;
        for (attribute, question, answer) in scene.questions() {
            c.answers.eval_vqa.push(VqaItem {
                id: format!("eval-{i:05}"),
                image: rel.clone(),
                attribute: attribute.to_string(),
                question,
                answer,
            });
        }
    }
    Ok(())
}

/// Short clips and long videos with their annotations, then the held-out
/// ones under `eval/videos/`.
#[cfg(feature = "video")]
fn videos(c: &mut Corpus) -> Result<()> {
    let sizes = &c.sizes.videos;
    let v = crate::videos::write(
        c.out,
        "videos",
        "",
        (sizes.clips, sizes.long),
        sizes,
        &mut c.rng,
    )?;
    c.file(VIDEO_SOURCES[0].1, json_array(&v.clips))?;
    c.file(VIDEO_SOURCES[1].1, json_array(&v.long))?;
    c.files.extend(v.files);
    c.text.extend(v.corpus);
    c.answers.video_vqa = v.qa;
    c.answers.video_needles = v.needles;
    let held_out = crate::videos::write(
        c.out,
        "eval/videos",
        "eval-",
        (c.sizes.eval.1, c.sizes.eval.2),
        &c.sizes.videos,
        &mut c.rng,
    )?;
    c.files.extend(held_out.files);
    c.answers.eval_video_vqa = held_out.qa;
    c.answers.eval_video_needles = held_out.needles;
    c.count(VIDEO_SOURCES[0].0, "video_qa", v.clips.len());
    c.count(VIDEO_SOURCES[1].0, "video_qa", v.long.len());
    Ok(())
}

/// `registry.toml`: every source with its kind and, for videos, its frame
/// policy.
fn registry() -> Registry {
    let entry = |name: &str, kind, file: &str, frames: Option<&str>| RegistryEntry {
        name: Some(name.to_string()),
        kind,
        path: file.into(),
        media_root: Some(".".into()),
        frames: frames.map(str::to_string),
    };
    let videos = VIDEO_SOURCES
        .iter()
        .filter(|_| cfg!(feature = "video"))
        .map(|(name, file, frames)| entry(name, SourceKind::Llava, file, Some(frames)));
    Registry {
        sources: SOURCES
            .iter()
            .map(|(name, kind, file)| entry(name, *kind, file, None))
            .chain(videos)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Scale;

    #[test]
    fn catalogue_codes_become_single_tokens_and_other_codes_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SynthSettings {
            out: dir.path().to_path_buf(),
            scale: Scale::Tiny,
            seed: 7,
        };
        let summary = write(&settings).unwrap();
        assert_eq!(summary.answers.counts["longdocs"], 6);
        let catalogue = Catalogue::new(7, Scale::Tiny.sizes().catalogue);
        // The long documents cite catalogue codes only.
        let longdocs = fs_err::read_to_string(dir.path().join("longdocs.jsonl")).unwrap();
        let mut cited = BTreeMap::<u32, usize>::new();
        for fact in longdocs.split("The secret code of ").skip(1) {
            let code: u32 = fact.split(" is ").nth(1).unwrap()[..4].parse().unwrap();
            assert!(
                catalogue.0.contains(&code),
                "{code} is not in the catalogue"
            );
            *cited.entry(code).or_default() += 1;
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let tokens = |code: u32| tokenizer.encode(format!(" {code}"), false).unwrap().len();
        let repeated: Vec<u32> = cited.iter().filter(|c| *c.1 >= 2).map(|c| *c.0).collect();
        assert!(repeated.len() >= 8, "{cited:?}");
        for &code in &repeated {
            assert_eq!(tokens(code), 1, "catalogue code {code}");
        }
        let others: Vec<u32> = (1000..10000).filter(|c| !catalogue.0.contains(c)).collect();
        assert!(others.iter().all(|&c| tokens(c) >= 2));
    }
}
