//! `lvpipe synth`: a seeded synthetic corpus in the real formats, with known answers.
//!
//! Images are coloured shapes (circle, square, triangle) in one of five
//! regions, one to three of them; captions and VQA state colour, shape, count
//! and position. Long documents carry planted facts ("needles") at known
//! depths. Because every answer is known (`answers.json`), a model trained on
//! the corpus shows whether decode, tokenize, mask, mix, pack, load and train
//! are right. Same seed and scale, same bytes.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::chat::SpecialTokens;
use crate::source::{Registry, RegistryEntry, SourceKind};
use crate::{Error, Result};

#[cfg(feature = "video")]
mod videos;

/// How much to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Dozens of samples, small images: seconds, for tests.
    Tiny,
    /// Thousands of samples: the demo and benchmarks.
    Small,
}

struct Sizes {
    pretrain: usize,
    sft: usize,
    wds: usize,
    interleaved: usize,
    longdocs: usize,
    /// Notes that repeat themselves: short ones, and long ones whose
    /// recalls lie up to ~2,000 tokens after the facts.
    notes: (usize, usize),
    image_side: (u32, u32),
    long_words: (usize, usize),
    vocab: usize,
    /// Codes common enough to be single tokens ([`Catalogue`]).
    catalogue: usize,
    /// Held-out evaluation set: images, short clips, long videos.
    eval: (usize, usize, usize),
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    videos: VideoSizes,
}

#[cfg_attr(not(feature = "video"), allow(dead_code))]
struct VideoSizes {
    clips: usize,
    clip_side: (u32, u32),
    long: usize,
    long_side: (u32, u32),
    long_seconds: u32,
}

impl Scale {
    fn sizes(self) -> Sizes {
        match self {
            Scale::Tiny => Sizes {
                pretrain: 24,
                sft: 16,
                wds: 12,
                interleaved: 6,
                longdocs: 6,
                notes: (40, 4),
                image_side: (48, 96),
                long_words: (300, 600),
                vocab: 1024,
                catalogue: 16,
                eval: (8, 2, 2),
                videos: VideoSizes {
                    clips: 8,
                    clip_side: (64, 48),
                    long: 3,
                    long_side: (64, 48),
                    long_seconds: 64,
                },
            },
            Scale::Small => Sizes {
                pretrain: 1200,
                sft: 1200,
                wds: 600,
                interleaved: 300,
                longdocs: 300,
                notes: (24_000, 1_600),
                image_side: (160, 320),
                long_words: (1500, 6000),
                vocab: 4096,
                catalogue: 512,
                eval: (200, 40, 10),
                videos: VideoSizes {
                    clips: 240,
                    clip_side: (128, 96),
                    long: 24,
                    long_side: (96, 72),
                    long_seconds: 120,
                },
            },
        }
    }
}

/// What to synthesize and where.
#[derive(Debug, Clone)]
pub struct SynthSettings {
    pub out: PathBuf,
    pub scale: Scale,
    pub seed: u64,
}

/// Source names synth writes, with their kind and file.
pub const SOURCES: [(&str, SourceKind, &str); 6] = [
    ("pretrain", SourceKind::Llava, "pretrain.json"),
    ("sft", SourceKind::Llava, "sft.json"),
    ("pairs-000", SourceKind::Wds, "pairs-000.tar"),
    ("interleaved", SourceKind::Interleaved, "interleaved.jsonl"),
    ("longdocs", SourceKind::Text, "longdocs.jsonl"),
    ("notes", SourceKind::Text, "notes.jsonl"),
];

/// Video sources synth writes when lvpipe is built with FFmpeg (the `video`
/// feature), with the frame policy the registry gives each: short clips as
/// stage 3 uses them, long videos at LongVILA's 2 fps cap.
pub const VIDEO_SOURCES: [(&str, &str, &str); 2] = [
    ("video_sft", "video_sft.json", "uniform:8"),
    ("longvideo", "longvideo.json", "fps:2,max:64"),
];

/// The known answers, written to `answers.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Answers {
    pub seed: u64,
    pub scale: String,
    /// Samples written per source name.
    pub counts: BTreeMap<String, u64>,
    /// The `kind` each source's samples get in shards.
    pub kinds: BTreeMap<String, String>,
    pub images: Vec<ImageFacts>,
    pub vqa: Vec<VqaItem>,
    pub needles: Vec<Needle>,
    /// Questions about the short clips (`video_sft.json`).
    #[serde(default)]
    pub video_vqa: Vec<VideoQaItem>,
    /// The shape that flashes in each long video (`longvideo.json`).
    #[serde(default)]
    pub video_needles: Vec<VideoNeedle>,
    /// The held-out evaluation set (`eval/`, in no source): every question
    /// of each image, of each clip, and each long video's needle.
    #[serde(default)]
    pub eval_vqa: Vec<VqaItem>,
    #[serde(default)]
    pub eval_video_vqa: Vec<VideoQaItem>,
    #[serde(default)]
    pub eval_video_needles: Vec<VideoNeedle>,
}

/// One question about a short clip and its answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VideoQaItem {
    pub id: String,
    pub video: String,
    pub attribute: String,
    pub question: String,
    pub answer: String,
}

/// A shape shown for two seconds somewhere in a long video.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VideoNeedle {
    pub id: String,
    pub video: String,
    /// Relative position of the needle's start in the video, 0 to 1.
    pub depth: f64,
    /// When it shows: `start_ms` <= t < `end_ms`.
    pub start_ms: i64,
    pub end_ms: i64,
    pub duration_ms: i64,
    pub colour: String,
    pub shape: String,
    pub question: String,
    pub answer: String,
}

/// What an image shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ImageFacts {
    /// Path relative to the output folder, or `pairs-000.tar!KEY.jpg`.
    pub file: String,
    pub colour: String,
    pub shape: String,
    pub count: u32,
    pub position: String,
}

/// One question of the SFT set and its answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct VqaItem {
    pub id: String,
    pub image: String,
    pub attribute: String,
    pub question: String,
    pub answer: String,
}

/// A planted fact in a long document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Needle {
    pub id: String,
    /// Relative position of the fact in the document, 0 to 1.
    pub depth: f64,
    pub question: String,
    pub answer: String,
}

/// What synth wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub answers: Answers,
    pub files: usize,
    pub bytes: u64,
}

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 205, 20]),
    ("purple", [140, 40, 170]),
    ("orange", [245, 130, 20]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const POSITIONS: [&str; 5] = [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "center",
];
const NUMBERS: [&str; 4] = ["zero", "one", "two", "three"];

#[derive(Debug, Clone)]
struct Scene {
    colour: usize,
    shape: usize,
    count: u32,
    position: usize,
}

impl Scene {
    fn random(rng: &mut SmallRng) -> Self {
        Scene {
            colour: rng.random_range(0..COLOURS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            count: rng.random_range(1..=3),
            position: rng.random_range(0..POSITIONS.len()),
        }
    }

    fn noun(&self) -> String {
        let shape = SHAPES[self.shape];
        if self.count == 1 {
            shape.to_string()
        } else {
            format!("{shape}s")
        }
    }

    fn where_(&self) -> String {
        match POSITIONS[self.position] {
            "center" => "in the center".to_string(),
            p => format!("at the {p}"),
        }
    }

    fn caption(&self, rng: &mut SmallRng) -> String {
        let (colour, count) = (COLOURS[self.colour].0, NUMBERS[self.count as usize]);
        let templates = [
            format!(
                "{} {colour} {} {}.",
                capitalize(count),
                self.noun(),
                self.where_()
            ),
            format!(
                "The image shows {count} {colour} {} {}.",
                self.noun(),
                self.where_()
            ),
            format!(
                "{} of the picture: {count} {colour} {}.",
                capitalize(&self.where_()),
                self.noun()
            ),
        ];
        templates.choose(rng).expect("non-empty").clone()
    }

    /// The four questions about the scene: (attribute, question, answer).
    fn questions(&self) -> Vec<(&'static str, String, String)> {
        let shape = SHAPES[self.shape];
        vec![
            (
                "colour",
                "What color are the shapes?".to_string(),
                COLOURS[self.colour].0.to_string(),
            ),
            (
                "shape",
                "Which shape is drawn?".to_string(),
                shape.to_string(),
            ),
            (
                "count",
                // Not "How many circles": a question naming the shape
                // would answer the shape question in the same conversation.
                "How many shapes are there?".to_string(),
                NUMBERS[self.count as usize].to_string(),
            ),
            (
                "position",
                "Where are the shapes?".to_string(),
                POSITIONS[self.position].to_string(),
            ),
        ]
    }

    fn facts(&self, file: String) -> ImageFacts {
        ImageFacts {
            file,
            colour: COLOURS[self.colour].0.to_string(),
            shape: SHAPES[self.shape].to_string(),
            count: self.count,
            position: POSITIONS[self.position].to_string(),
        }
    }

    /// Draws the scene: `count` shapes inside the scene's region.
    fn render(&self, rng: &mut SmallRng, w: u32, h: u32) -> RgbImage {
        let tint: [u8; 3] = [
            rng.random_range(225..=250),
            rng.random_range(225..=250),
            rng.random_range(225..=250),
        ];
        let mut img = RgbImage::from_pixel(w, h, Rgb(tint));
        let (fw, fh) = (w as f32, h as f32);
        // Region as fractions of the image: [x0, x1) x [y0, y1).
        let (x0, x1, y0, y1) = match POSITIONS[self.position] {
            "top left" => (0.0, 0.5, 0.0, 0.5),
            "top right" => (0.5, 1.0, 0.0, 0.5),
            "bottom left" => (0.0, 0.5, 0.5, 1.0),
            "bottom right" => (0.5, 1.0, 0.5, 1.0),
            _ => (0.25, 0.75, 0.25, 0.75),
        };
        let (rw, rh) = ((x1 - x0) * fw, (y1 - y0) * fh);
        // Shapes sit side by side along the region's longer axis.
        let n = self.count as f32;
        let horizontal = rw >= rh;
        // Shapes fill most of their cell: at the tiny recipe's 64 px a
        // third of a quadrant is 10 px, and smaller shapes lose their kind.
        let r = if horizontal {
            (rw / n).min(rh) * 0.45
        } else {
            (rh / n).min(rw) * 0.45
        };
        let colour = Rgb(COLOURS[self.colour].1);
        for i in 0..self.count {
            let t = (i as f32 + 0.5) / n;
            let (cx, cy) = if horizontal {
                (x0 * fw + t * rw, y0 * fh + rh / 2.0)
            } else {
                (x0 * fw + rw / 2.0, y0 * fh + t * rh)
            };
            let (cx, cy) = (
                cx + rng.random_range(-0.1..0.1) * r,
                cy + rng.random_range(-0.1..0.1) * r,
            );
            draw_shape(&mut img, SHAPES[self.shape], cx, cy, r, colour.0);
        }
        img
    }
}

/// Width and height of a scene image: the width within `(lo, hi)`, the
/// aspect ratio within 4:5 to 5:4. Padding to square shrinks a scene by its
/// aspect ratio, and the tiny recipe looks at 64 px: wider ranges made the
/// shapes a few pixels wide and their kind unreadable.
fn image_dims(rng: &mut SmallRng, (lo, hi): (u32, u32)) -> (u32, u32) {
    let w = rng.random_range(lo..=hi);
    let h = (w as f32 * rng.random_range(0.8..1.25)).round() as u32;
    (w, h.max(1))
}

/// Fills `shape` of radius `r` centred at (`cx`, `cy`), clipped to the image.
fn draw_shape(img: &mut RgbImage, shape: &str, cx: f32, cy: f32, r: f32, colour: [u8; 3]) {
    let (w, h) = img.dimensions();
    let bx0 = (cx - r).floor().max(0.0) as u32;
    let by0 = (cy - r).floor().max(0.0) as u32;
    let bx1 = ((cx + r).ceil().max(0.0) as u32).min(w - 1);
    let by1 = ((cy + r).ceil().max(0.0) as u32).min(h - 1);
    for y in by0..=by1 {
        for x in bx0..=bx1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                // Apex up: the half-width grows from 0 at the top to r at the bottom.
                _ => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
            };
            if inside {
                img.put_pixel(x, y, Rgb(colour));
            }
        }
    }
}

/// A conversation of questions and answers (`"Red."`), the media
/// placeholder (`<image>` or `<video>`) before the first question.
fn qa_turns(placeholder: &str, qas: &[(&str, String, String)]) -> Vec<LlavaTurn> {
    let mut turns = Vec::with_capacity(qas.len() * 2);
    for (i, (_, question, answer)) in qas.iter().enumerate() {
        let value = if i == 0 {
            format!("{placeholder}\n{question}")
        } else {
            question.clone()
        };
        turns.push(LlavaTurn {
            from: "human",
            value,
        });
        turns.push(LlavaTurn {
            from: "gpt",
            value: format!("{}.", capitalize(answer)),
        });
    }
    turns
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
                .encode_image(img)
                .map_err(|e| Error::Internal(format!("jpeg encode: {e}")))?;
        }
        _ => img
            .write_to(&mut Cursor::new(&mut out), format)
            .map_err(|e| Error::Internal(format!("image encode: {e}")))?,
    }
    Ok(out)
}

#[derive(Serialize)]
struct LlavaTurn {
    from: &'static str,
    value: String,
}

#[derive(Serialize)]
struct LlavaRecord {
    id: String,
    image: String,
    conversations: Vec<LlavaTurn>,
}

#[derive(Serialize)]
struct Mmc4Image {
    image_name: String,
    matched_text_index: usize,
}

#[derive(Serialize)]
struct Mmc4Record {
    id: String,
    url: String,
    text_list: Vec<String>,
    image_info: Vec<Mmc4Image>,
}

#[derive(Serialize)]
struct TextRecord {
    id: String,
    text: String,
}

const FILLER_SUBJECTS: [&str; 12] = [
    "the old mill",
    "a quiet river",
    "the northern road",
    "the village baker",
    "a tall lighthouse",
    "the morning train",
    "the market square",
    "a small garden",
    "the city library",
    "a wooden bridge",
    "the harbour master",
    "the hill farm",
];
const FILLER_VERBS: [&str; 10] = [
    "stood near",
    "looked over",
    "was far from",
    "was painted like",
    "was older than",
    "was quieter than",
    "opened toward",
    "was built beside",
    "was seen from",
    "was known for",
];
const FILLER_TAILS: [&str; 10] = [
    "in the early spring",
    "after the long rain",
    "during the festival",
    "before the winter came",
    "when the bells rang",
    "on most evenings",
    "for many years",
    "under a grey sky",
    "at the end of the day",
    "without any noise",
];
const NAMES: [&str; 16] = [
    "Alder", "Brisa", "Corvin", "Delia", "Emrys", "Fenna", "Galen", "Hesper", "Ilsa", "Jory",
    "Kestrel", "Liora", "Maren", "Nilo", "Orla", "Perrin",
];

/// Codes that recur across documents, as years and prices do in web text.
/// The long documents cite only these, so the tokenizer makes each of them
/// one token and reads any other 4-digit code in pieces; the code lists
/// draw [`LEDGER_COMMON`] of their items from them. With every code cited
/// in the long documents instead, the tokenizer spent 2,723 entries on
/// whole codes, each read a few times in the lists: the copy head attended
/// to them but did not copy them, and the needles whose code was one of
/// them (about 30%) were found 2 times in 37 at 2,048 tokens
/// (docs/trainer.md, "Needles").
struct Catalogue(Vec<u32>);

impl Catalogue {
    fn new(seed: u64, n: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x636f_6465);
        let mut all: Vec<u32> = (1000..10000).collect();
        all.shuffle(&mut rng);
        all.truncate(n);
        Catalogue(all)
    }

    /// A catalogue code.
    fn common(&self, rng: &mut SmallRng) -> String {
        self.0.choose(rng).expect("non-empty").to_string()
    }

    /// A catalogue code with probability `p`, else any 4-digit code.
    fn code(&self, rng: &mut SmallRng, p: f64) -> String {
        if rng.random_bool(p) {
            self.common(rng)
        } else {
            rng.random_range(1000..10000u32).to_string()
        }
    }
}

/// The share of code-list items drawn from the [`Catalogue`].
const LEDGER_COMMON: f64 = 0.3;

/// The sentence of a planted fact; a recall repeats it, and a needle
/// question is its prefix up to "is" ([`needle_prompt`]).
pub fn needle_fact(name: &str, code: &str) -> String {
    format!("{} {code}.", needle_prompt(name))
}

/// What a model completes with the code when it has retrieved the fact.
pub fn needle_prompt(name: &str) -> String {
    format!("The secret code of {name} is")
}

/// `n` filler sentences of the long documents, from `seed`: haystacks for
/// needle and perplexity evaluations.
pub fn filler_sentences(seed: u64, n: usize) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| filler_sentence(&mut rng)).collect()
}

/// Names of the needles (`{name}{index}` in documents).
pub const NEEDLE_NAMES: [&str; 16] = NAMES;

/// `gap` filler sentences.
fn filler(rng: &mut SmallRng, gap: usize) -> Vec<String> {
    (0..gap).map(|_| filler_sentence(rng)).collect()
}

/// A list of 3 to 10 codes, `gap` filler sentences, and the list again:
/// every token of the repeat can be copied. [`LEDGER_COMMON`] of the codes
/// are from the catalogue: single tokens that occur once in a list, on
/// which the copy forms; the rest are read in pieces, as most needles are.
fn ledger_note(rng: &mut SmallRng, gap: usize, codes: &Catalogue) -> String {
    let n = rng.random_range(3..=10);
    let codes: Vec<String> = (0..n).map(|_| codes.code(rng, LEDGER_COMMON)).collect();
    let list = format!("The ledger reads {}.", codes.join(" "));
    let mut sentences = vec![list.clone()];
    sentences.extend(filler(rng, gap));
    sentences.push(list);
    sentences.join(" ")
}

/// One to six secret codes somewhere in `gap` filler sentences, and every
/// code recalled in another order at the end: the recalled codes can be
/// copied by name. The facts sit at any depth, as the needles do (stated
/// first, the copy learned that facts are found only at a document's start),
/// and in a quarter of the long notes right before the recalls: a needle at
/// depth 1 is asked right after its fact, deep in a long document, which
/// uniform depths almost never showed (the copy then found 1 in 12 such
/// needles at 2,048 tokens, against 4 in 12 with these notes).
fn roster_note(rng: &mut SmallRng, gap: usize) -> String {
    let facts: Vec<String> = (0..rng.random_range(1..=6))
        .map(|_| {
            let name = format!(
                "{}{}",
                NAMES.choose(rng).expect("non-empty"),
                rng.random_range(0..9000u32)
            );
            needle_fact(&name, &rng.random_range(1000..10000u32).to_string())
        })
        .collect();
    let mut recalls = facts.clone();
    recalls.shuffle(rng);
    let lead = if gap > 3 && rng.random_bool(0.25) {
        gap
    } else {
        rng.random_range(0..=gap)
    };
    let mut sentences = filler(rng, lead);
    sentences.extend(facts);
    sentences.extend(filler(rng, gap - lead));
    sentences.extend(recalls);
    sentences.join(" ")
}

fn filler_sentence(rng: &mut SmallRng) -> String {
    let s = FILLER_SUBJECTS.choose(rng).expect("non-empty");
    let v = FILLER_VERBS.choose(rng).expect("non-empty");
    let o = FILLER_SUBJECTS.choose(rng).expect("non-empty");
    let t = FILLER_TAILS.choose(rng).expect("non-empty");
    format!("{} {v} {o} {t}.", capitalize(s))
}

/// Writes the corpus into `settings.out`.
pub fn synthesize(settings: &SynthSettings) -> Result<SynthSummary> {
    let out = &settings.out;
    let sizes = settings.scale.sizes();
    let mut rng = SmallRng::seed_from_u64(settings.seed);
    fs_err::create_dir_all(out.join("images"))?;
    let mut files = Vec::<PathBuf>::new();
    let mut answers = Answers {
        seed: settings.seed,
        scale: format!("{:?}", settings.scale).to_lowercase(),
        counts: BTreeMap::new(),
        kinds: BTreeMap::new(),
        images: vec![],
        vqa: vec![],
        needles: vec![],
        video_vqa: vec![],
        video_needles: vec![],
        eval_vqa: vec![],
        eval_video_vqa: vec![],
        eval_video_needles: vec![],
    };
    // Every piece of text also feeds the tokenizer trainer.
    let mut corpus: Vec<String> = Vec::new();
    let mut image_file =
        |rng: &mut SmallRng, name: &str, scene: &Scene, i: usize| -> Result<String> {
            let (w, h) = image_dims(rng, sizes.image_side);
            let (ext, format) = if i % 2 == 0 {
                ("png", ImageFormat::Png)
            } else {
                ("jpg", ImageFormat::Jpeg)
            };
            let rel = format!("images/{name}.{ext}");
            let path = out.join(&rel);
            fs_err::write(&path, encode(&scene.render(rng, w, h), format)?)?;
            files.push(path);
            Ok(rel)
        };

    // Stage-1 style pairs: LLaVA pretrain JSON.
    let mut pretrain = Vec::new();
    for i in 0..sizes.pretrain {
        let scene = Scene::random(&mut rng);
        let id = format!("pretrain-{i:05}");
        let image = image_file(&mut rng, &id, &scene, i)?;
        let caption = scene.caption(&mut rng);
        corpus.push(caption.clone());
        answers.images.push(scene.facts(image.clone()));
        pretrain.push(LlavaRecord {
            id,
            image,
            conversations: vec![
                LlavaTurn {
                    from: "human",
                    value: "<image>\nDescribe the image briefly.".into(),
                },
                LlavaTurn {
                    from: "gpt",
                    value: caption,
                },
            ],
        });
    }

    // Multi-turn VQA: LLaVA SFT JSON.
    let mut sft = Vec::new();
    for i in 0..sizes.sft {
        let scene = Scene::random(&mut rng);
        let id = format!("sft-{i:05}");
        let image = image_file(&mut rng, &id, &scene, i + 1)?;
        answers.images.push(scene.facts(image.clone()));
        let mut qas = scene.questions();
        // Two or three of the four questions, in a random order.
        for k in (1..qas.len()).rev() {
            qas.swap(k, rng.random_range(0..=k));
        }
        qas.truncate(rng.random_range(2..=3));
        let conversations = qa_turns(SpecialTokens::IMAGE, &qas);
        for (attribute, question, answer) in qas {
            corpus.push(format!("{question} {}.", capitalize(&answer)));
            answers.vqa.push(VqaItem {
                id: id.clone(),
                image: image.clone(),
                attribute: attribute.to_string(),
                question,
                answer,
            });
        }
        sft.push(LlavaRecord {
            id,
            image,
            conversations,
        });
    }

    // WebDataset pairs: KEY.jpg + KEY.txt in one tar.
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..sizes.wds {
        let scene = Scene::random(&mut rng);
        let (w, h) = image_dims(&mut rng, sizes.image_side);
        let jpg = encode(&scene.render(&mut rng, w, h), ImageFormat::Jpeg)?;
        let caption = scene.caption(&mut rng);
        corpus.push(caption.clone());
        let key = format!("{i:06}");
        answers
            .images
            .push(scene.facts(format!("pairs-000.tar!{key}.jpg")));
        for (name, bytes) in [
            (format!("{key}.jpg"), jpg),
            (format!("{key}.txt"), caption.into_bytes()),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            tar.append_data(&mut header, &name, bytes.as_slice())?;
        }
    }
    let tar_bytes = tar.into_inner()?;

    // Interleaved documents: paragraphs with the images they describe.
    let mut interleaved = Vec::new();
    for i in 0..sizes.interleaved {
        let id = format!("doc-{i:05}");
        let mut text_list = vec![format!(
            "{} {}",
            filler_sentence(&mut rng),
            filler_sentence(&mut rng)
        )];
        let mut image_info = Vec::new();
        for j in 0..rng.random_range(1..=3) {
            let scene = Scene::random(&mut rng);
            let image = image_file(&mut rng, &format!("{id}-{j}"), &scene, i + j)?;
            answers.images.push(scene.facts(image.clone()));
            image_info.push(Mmc4Image {
                image_name: image,
                matched_text_index: text_list.len(),
            });
            text_list.push(format!(
                "{} {}",
                scene.caption(&mut rng),
                filler_sentence(&mut rng)
            ));
        }
        corpus.extend(text_list.iter().cloned());
        interleaved.push(Mmc4Record {
            url: format!("synth://{id}"),
            id,
            text_list,
            image_info,
        });
    }

    // Long documents with one planted fact each, at depths cycling 0..1.
    let catalogue = Catalogue::new(settings.seed, sizes.catalogue);
    let depths = [0.0, 0.25, 0.5, 0.75, 1.0];
    let mut longdocs = Vec::new();
    for i in 0..sizes.longdocs {
        let id = format!("long-{i:05}");
        let depth = depths[i % depths.len()];
        let name = format!("{}{}", NAMES.choose(&mut rng).expect("non-empty"), i);
        let code = catalogue.common(&mut rng);
        let target_words = rng.random_range(sizes.long_words.0..=sizes.long_words.1);
        let mut sentences = Vec::new();
        let mut words = 0;
        while words < target_words {
            let s = filler_sentence(&mut rng);
            words += s.split_whitespace().count();
            sentences.push(s);
        }
        // Further facts, each recalled later in the document: retrieval
        // across the context is what the long-context stages can learn.
        for k in 0..target_words / 150 {
            let other = format!("{}{i}x{k}", NAMES.choose(&mut rng).expect("non-empty"));
            let other_code = catalogue.common(&mut rng);
            let fact = rng.random_range(0..=sentences.len());
            sentences.insert(fact, needle_fact(&other, &other_code));
            let recall = rng.random_range(fact + 1..=sentences.len());
            sentences.insert(recall, needle_fact(&other, &other_code));
        }
        let at = ((sentences.len() as f64) * depth).round() as usize;
        sentences.insert(at.min(sentences.len()), needle_fact(&name, &code));
        // The planted fact is recalled at the end.
        sentences.push(needle_fact(&name, &code));
        let text = sentences.join(" ");
        corpus.push(text.clone());
        answers.needles.push(Needle {
            id: id.clone(),
            depth,
            question: format!("What is the secret code of {name}?"),
            answer: code,
        });
        longdocs.push(TextRecord { id, text });
    }

    // Notes: documents that repeat themselves, as web text does. Copying
    // from context (an induction head) is what the LLM learns from them;
    // LongVILA's Qwen2 arrives with it from pretraining, ours starts random.
    // Names stay below 9000: the needle evaluation's are 9000 and up.
    // Their own generator, so that adding them left the rest of the corpus
    // (and the tokenizer trained on it) as it was.
    let mut rng_notes = SmallRng::seed_from_u64(settings.seed ^ 0x6e6f_7465);
    let mut notes = Vec::new();
    for i in 0..sizes.notes.0 + sizes.notes.1 {
        let rng = &mut rng_notes;
        let gap = if i < sizes.notes.0 {
            rng.random_range(0..=3)
        } else {
            rng.random_range(16..=140)
        };
        let text = if rng.random_bool(0.5) {
            ledger_note(rng, gap, &catalogue)
        } else {
            roster_note(rng, gap)
        };
        notes.push(TextRecord {
            id: format!("note-{i:06}"),
            text,
        });
    }

    // The held-out evaluation images: every question of each.
    fs_err::create_dir_all(out.join("eval/images"))?;
    for i in 0..sizes.eval.0 {
        let scene = Scene::random(&mut rng);
        let (w, h) = image_dims(&mut rng, sizes.image_side);
        let rel = format!("eval/images/eval-{i:05}.png");
        let path = out.join(&rel);
        fs_err::write(
            &path,
            encode(&scene.render(&mut rng, w, h), ImageFormat::Png)?,
        )?;
        files.push(path);
        for (attribute, question, answer) in scene.questions() {
            answers.eval_vqa.push(VqaItem {
                id: format!("eval-{i:05}"),
                image: rel.clone(),
                attribute: attribute.to_string(),
                question,
                answer,
            });
        }
    }

    #[cfg(feature = "video")]
    {
        let v = videos::write(
            out,
            "videos",
            "",
            (sizes.videos.clips, sizes.videos.long),
            &sizes.videos,
            &mut rng,
        )?;
        for (name, records) in [
            (VIDEO_SOURCES[0].1, &v.clips),
            (VIDEO_SOURCES[1].1, &v.long),
        ] {
            let path = out.join(name);
            fs_err::write(&path, json_array(records))?;
            files.push(path);
        }
        files.extend(v.files);
        corpus.extend(v.corpus);
        answers.video_vqa = v.qa;
        answers.video_needles = v.needles;
        let held_out = videos::write(
            out,
            "eval/videos",
            "eval-",
            (sizes.eval.1, sizes.eval.2),
            &sizes.videos,
            &mut rng,
        )?;
        files.extend(held_out.files);
        answers.eval_video_vqa = held_out.qa;
        answers.eval_video_needles = held_out.needles;
        for ((name, ..), count) in VIDEO_SOURCES.iter().zip([v.clips.len(), v.long.len()]) {
            answers.counts.insert(name.to_string(), count as u64);
            answers
                .kinds
                .insert(name.to_string(), "video_qa".to_string());
        }
    }

    let written: [(&str, Vec<u8>); 6] = [
        ("pretrain.json", json_array(&pretrain).into_bytes()),
        ("sft.json", json_array(&sft).into_bytes()),
        ("pairs-000.tar", tar_bytes),
        ("interleaved.jsonl", json_lines(&interleaved).into_bytes()),
        ("longdocs.jsonl", json_lines(&longdocs).into_bytes()),
        ("notes.jsonl", json_lines(&notes).into_bytes()),
    ];
    for (name, bytes) in written {
        let path = out.join(name);
        fs_err::write(&path, bytes)?;
        files.push(path);
    }
    let counts = [
        sizes.pretrain,
        sizes.sft,
        sizes.wds,
        sizes.interleaved,
        sizes.longdocs,
        sizes.notes.0 + sizes.notes.1,
    ];
    let kinds = [
        "image_text",
        "image_text",
        "image_text",
        "interleaved",
        "text",
        "text",
    ];
    for ((name, _, _), (count, kind)) in SOURCES.iter().zip(counts.into_iter().zip(kinds)) {
        answers.counts.insert(name.to_string(), count as u64);
        answers.kinds.insert(name.to_string(), kind.to_string());
    }

    let tokenizer = out.join("tokenizer.json");
    train_tokenizer(&corpus, sizes.vocab, &tokenizer)?;
    files.push(tokenizer);

    let registry = Registry {
        sources: SOURCES
            .iter()
            .map(|(name, kind, file)| RegistryEntry {
                name: Some(name.to_string()),
                kind: *kind,
                path: file.into(),
                media_root: Some(".".into()),
                frames: None,
            })
            .chain(
                VIDEO_SOURCES
                    .iter()
                    .filter(|_| cfg!(feature = "video"))
                    .map(|(name, file, frames)| RegistryEntry {
                        name: Some(name.to_string()),
                        kind: SourceKind::Llava,
                        path: file.into(),
                        media_root: Some(".".into()),
                        frames: Some(frames.to_string()),
                    }),
            )
            .collect(),
    };
    for (name, text) in [
        ("registry.toml", registry.to_toml()),
        (
            "answers.json",
            serde_json::to_string_pretty(&answers).expect("answers serialize") + "\n",
        ),
    ] {
        let path = out.join(name);
        fs_err::write(&path, text)?;
        files.push(path);
    }
    let bytes = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(SynthSummary {
        answers,
        files: files.len(),
        bytes,
    })
}

fn json_array<T: Serialize>(items: &[T]) -> String {
    serde_json::to_string_pretty(items).expect("plain data serializes") + "\n"
}

fn json_lines<T: Serialize>(items: &[T]) -> String {
    let lines: Vec<String> = items
        .iter()
        .map(|i| serde_json::to_string(i).expect("plain data serializes"))
        .collect();
    lines.join("\n") + "\n"
}

/// Trains a byte-level BPE on `corpus` with the ChatML and media special
/// tokens, and saves it as a Hugging Face `tokenizer.json`.
pub fn train_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    let fail = |e: tokenizers::Error| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let special: Vec<AddedToken> = SpecialTokens::ALL
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(fail)?;
    tokenizer.train(&mut trainer, corpus.iter()).map_err(fail)?;
    let json = tokenizer.to_string(true).map_err(fail)?;
    fs_err::write(path, json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentences(text: &str) -> Vec<&str> {
        text.split_inclusive(". ").map(str::trim).collect()
    }

    /// The codes of a ledger note's first list.
    fn ledger_codes(note: &str) -> Vec<&str> {
        sentences(note)[0]
            .strip_prefix("The ledger reads ")
            .and_then(|l| l.strip_suffix('.'))
            .unwrap()
            .split(' ')
            .collect()
    }

    #[test]
    fn ledger_notes_read_the_same_list_twice_around_the_filler() {
        let mut rng = SmallRng::seed_from_u64(1);
        for gap in [0, 2, 40] {
            let note = ledger_note(&mut rng, gap, &Catalogue::new(1, 16));
            let s = sentences(&note);
            assert_eq!(s.len(), gap + 2, "{note}");
            assert_eq!(s[0], s[gap + 1]);
            let codes = ledger_codes(&note);
            assert!((3..=10).contains(&codes.len()), "{note}");
            assert!(
                codes
                    .iter()
                    .all(|c| c.len() == 4 && c.parse::<u32>().is_ok())
            );
            assert!(
                s[1..=gap]
                    .iter()
                    .all(|f| !f.contains("ledger") && !f.contains(" is "))
            );
        }
    }

    #[test]
    fn roster_notes_recall_every_code_by_name_after_the_filler() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut leads = Vec::new();
        for gap in [0, 3, 100, 100, 100] {
            let note = roster_note(&mut rng, gap);
            let s = sentences(&note);
            let k = (s.len() - gap) / 2;
            assert!((1..=6).contains(&k) && s.len() == 2 * k + gap, "{note}");
            // The facts: k in a row somewhere in the filler, then the recalls.
            let at: Vec<usize> = (0..s.len()).filter(|&i| s[i].contains(" is ")).collect();
            assert_eq!(at.len(), 2 * k, "{note}");
            let lead = at[0];
            assert_eq!(at[..k], (lead..lead + k).collect::<Vec<_>>()[..], "{note}");
            assert_eq!(
                at[k..],
                (s.len() - k..s.len()).collect::<Vec<_>>()[..],
                "{note}"
            );
            leads.push(lead);
            let mut stated: Vec<&str> = s[lead..lead + k].to_vec();
            let mut recalled: Vec<&str> = s[s.len() - k..].to_vec();
            stated.sort();
            recalled.sort();
            assert_eq!(stated, recalled, "{note}");
            for fact in &stated {
                let name = fact
                    .strip_prefix("The secret code of ")
                    .and_then(|f| f.split(" is ").next())
                    .unwrap();
                let index: u32 = name
                    .trim_start_matches(char::is_alphabetic)
                    .parse()
                    .unwrap();
                assert!(
                    index < 9000,
                    "{name} could collide with an evaluation needle"
                );
            }
        }
        // Long notes state their facts at different depths.
        assert!(leads[2..].iter().any(|&l| l != leads[2]), "{leads:?}");
    }

    #[test]
    fn catalogue_codes_become_single_tokens_and_other_codes_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SynthSettings {
            out: dir.path().to_path_buf(),
            scale: Scale::Tiny,
            seed: 7,
        };
        synthesize(&settings).unwrap();
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

    #[test]
    fn a_fraction_of_ledger_items_are_catalogue_codes() {
        let mut rng = SmallRng::seed_from_u64(4);
        let catalogue = Catalogue::new(4, 512);
        let items: Vec<u32> = (0..300)
            .flat_map(|_| {
                let note = ledger_note(&mut rng, 0, &catalogue);
                ledger_codes(&note)
                    .iter()
                    .map(|c| c.parse().unwrap())
                    .collect::<Vec<u32>>()
            })
            .collect();
        let common = items.iter().filter(|c| catalogue.0.contains(c)).count();
        // LEDGER_COMMON (0.3) drawn from it, and 512 in 9,000 of the rest.
        let share = common as f64 / items.len() as f64;
        assert!((0.27..0.38).contains(&share), "{common} of {}", items.len());
    }

    #[test]
    fn a_quarter_of_long_roster_notes_recall_right_after_their_facts() {
        let mut rng = SmallRng::seed_from_u64(3);
        let gap = 60;
        let leads: Vec<usize> = (0..400)
            .map(|_| {
                let note = roster_note(&mut rng, gap);
                let s = sentences(&note);
                s.iter().position(|s| s.contains(" is ")).unwrap()
            })
            .collect();
        // A quarter on purpose, and 1 in 61 of the rest by the uniform draw.
        let last = leads.iter().filter(|&&l| l == gap).count();
        assert!(
            (80..=130).contains(&last),
            "{last} of 400 notes state their facts right before the recalls"
        );
        // The others still sit at any depth.
        let early = leads.iter().filter(|&&l| l < gap / 2).count();
        assert!(early > 100, "{early} of 400 in the first half: {leads:?}");
    }
}
