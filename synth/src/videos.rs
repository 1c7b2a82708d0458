//! Synthetic videos with known answers: short clips of a moving shape (what
//! it is, its colour, which way it moves) and long videos in which a shape
//! flashes for two seconds at a known time (the video needle), with
//! questions whose answers sit in that one part of the video.

use std::path::{Path, PathBuf};

use rand::Rng;
use rand::rngs::SmallRng;
use serde::Serialize;

use lvpipe_schemas::tokens;

use crate::answers::{VideoNeedle, VideoQaItem};
use crate::encode::{self, Codec, Spec};
use crate::formats::{LlavaTurn, qa_turns};
use crate::scene::{COLOURS, SHAPES, capitalize, draw_needle, draw_shape};
use crate::{Error, Result, VideoSizes};

/// A LLaVA/VILA video annotation.
#[derive(Serialize)]
pub(crate) struct VideoRecord {
    id: String,
    video: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fps: Option<f64>,
    conversations: Vec<LlavaTurn>,
}

pub(crate) struct Written {
    pub clips: Vec<VideoRecord>,
    pub long: Vec<VideoRecord>,
    pub qa: Vec<VideoQaItem>,
    pub needles: Vec<VideoNeedle>,
    pub files: Vec<PathBuf>,
    pub corpus: Vec<String>,
}

/// Frames per second of the short clips and of the long videos.
const CLIP_FPS: u32 = 10;
const CLIP_FRAMES: u32 = 30;
const LONG_FPS: u32 = 4;
/// The long videos' ground: light, as the images' and clips'. On a dark
/// ground ([40, 40, 40]) the tower, trained on light ones in stages 1-3,
/// did not show the needle to the LLM: a stage 5 of long videos alone read
/// its colour 21.5% of the time (chance 16.7%), 88.5% on this ground.
const LONG_GROUND: [u8; 3] = [235, 235, 235];
/// How long the needle shows, in frames of the long videos (2 s).
const NEEDLE_FRAMES: u32 = 8;

/// Writes `clips` short clips and `long` long videos into `out/DIR`, ids
/// prefixed with `prefix` (the held-out evaluation set uses `eval-`).
pub(crate) fn write(
    out: &Path,
    dir: &str,
    prefix: &str,
    (clips, long): (usize, usize),
    sizes: &VideoSizes,
    rng: &mut SmallRng,
) -> Result<Written> {
    fs_err::create_dir_all(out.join(dir))?;
    let mut w = Written {
        clips: vec![],
        long: vec![],
        qa: vec![],
        needles: vec![],
        files: vec![],
        corpus: vec![],
    };
    let vp9 = Codec::Vp9.available();
    let at = Place { out, dir, prefix };
    for i in 0..clips {
        clip(&at, i, sizes, vp9, rng, &mut w)?;
    }
    for i in 0..long {
        long_video(&at, i, sizes, rng, &mut w)?;
    }
    Ok(w)
}

fn fail(path: &Path, e: ffmpeg_next::Error) -> Error {
    Error::Video {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Where videos go: `out/DIR`, ids prefixed with the prefix.
#[derive(Clone, Copy)]
struct Place<'a> {
    out: &'a Path,
    dir: &'a str,
    prefix: &'a str,
}

/// Short clip `i`: a shape moving left or right, two of its three questions.
fn clip(
    at: &Place,
    i: usize,
    sizes: &VideoSizes,
    vp9: bool,
    rng: &mut SmallRng,
    w: &mut Written,
) -> Result<()> {
    let Place { out, dir, prefix } = *at;
    let id = format!("{prefix}clip-{i:05}");
    let (colour, shape) = (
        rng.random_range(0..COLOURS.len()),
        rng.random_range(0..SHAPES.len()),
    );
    let rightward = rng.random_bool(0.5);
    let (cw, ch) = sizes.clip_side;
    // Every fourth clip is VP9 in WebM where this FFmpeg can encode it.
    let webm = vp9 && i % 4 == 3;
    let rel = format!("{dir}/{id}.{}", if webm { "webm" } else { "mp4" });
    let path = out.join(&rel);
    let mut spec = Spec::new(cw, ch, CLIP_FPS);
    spec.codec = if webm { Codec::Vp9 } else { Codec::H264 };
    let tint: [u8; 3] = [
        rng.random_range(225..=250),
        rng.random_range(225..=250),
        235,
    ];
    let r = ch as f32 * 0.25;
    let frames = (0..CLIP_FRAMES).map(|f| {
        let t = f as f32 / (CLIP_FRAMES - 1) as f32;
        let t = if rightward { t } else { 1.0 - t };
        let cx = r + t * (cw as f32 - 2.0 * r);
        let mut img = image::RgbImage::from_pixel(cw, ch, image::Rgb(tint));
        draw_shape(
            &mut img,
            SHAPES[shape],
            cx,
            ch as f32 / 2.0,
            r,
            COLOURS[colour].1,
        );
        (i64::from(f) * 1000 / i64::from(CLIP_FPS), img.into_raw())
    });
    encode::write(&path, &spec, frames).map_err(|e| fail(&path, e))?;
    w.files.push(path);
    let direction = if rightward {
        "left to right"
    } else {
        "right to left"
    };
    let mut qas = vec![
        (
            "shape",
            "What shape moves across the video?".to_string(),
            SHAPES[shape].to_string(),
        ),
        (
            "colour",
            "What color is the moving shape?".to_string(),
            COLOURS[colour].0.to_string(),
        ),
        (
            "direction",
            "Which way does the shape move?".to_string(),
            direction.to_string(),
        ),
    ];
    for k in (1..qas.len()).rev() {
        qas.swap(k, rng.random_range(0..=k));
    }
    qas.truncate(2);
    let conversations = qa_turns(tokens::VIDEO, &qas);
    for (attribute, question, answer) in qas {
        w.corpus
            .push(format!("{question} {}.", capitalize(&answer)));
        w.qa.push(VideoQaItem {
            id: id.clone(),
            video: rel.clone(),
            attribute: attribute.to_string(),
            question,
            answer,
        });
    }
    w.clips.push(VideoRecord {
        id,
        video: rel,
        // Half the annotations carry VILA's optional `fps`.
        fps: i.is_multiple_of(2).then_some(f64::from(CLIP_FPS)),
        conversations,
    });
    Ok(())
}

/// The questions about a long video's flash: kind, question, answer (the
/// needle question first).
fn long_questions(colour: &str, shape: &str, depth: f64) -> [(&'static str, String, String); 4] {
    let when = if depth < 1.0 / 3.0 {
        "near the beginning"
    } else if depth < 2.0 / 3.0 {
        "in the middle"
    } else {
        "near the end"
    };
    [
        ("needle", NEEDLE_QUESTION.to_string(), colour.to_string()),
        (
            "needle_object",
            "What colored shape appears briefly in the video?".to_string(),
            format!("a {colour} {shape}"),
        ),
        (
            "needle_shape",
            "What shape appears briefly in the video?".to_string(),
            shape.to_string(),
        ),
        (
            "needle_time",
            "When does the shape appear: near the beginning, in the middle, or near the end?"
                .to_string(),
            when.to_string(),
        ),
    ]
}

/// What the video needle asks, in training and in V-NIAH: the colour of the
/// shape that flashes. Asked for colour and shape at once ("A blue
/// square."), a stage-5 model that read the flash's colour 88.5% of the
/// time scored 0% on V-NIAH.
pub(crate) const NEEDLE_QUESTION: &str = "What color is the shape that appears briefly?";

/// Long video `i`: a wandering dot, and a shape that shows for two seconds.
/// Training videos last anywhere in the sizes' range with the shape at any
/// depth, and ask the needle question (the flash's colour) and one other
/// about it (its colour and shape, its shape, or when it shows); held-out
/// ones last the longest, with depths cycling 0.1 to 0.9.
fn long_video(
    at: &Place,
    i: usize,
    sizes: &VideoSizes,
    rng: &mut SmallRng,
    w: &mut Written,
) -> Result<()> {
    let Place { out, dir, prefix } = *at;
    let held_out = !prefix.is_empty();
    let id = format!("{prefix}long-video-{i:05}");
    let (lw, lh) = sizes.long_side;
    let (shortest, longest) = sizes.long_seconds;
    let (seconds, depth) = if held_out {
        let depths = [0.1, 0.3, 0.5, 0.7, 0.9];
        (longest, depths[i % depths.len()])
    } else {
        // Log-uniform: as many videos of 4 to 8 s (the flash a quarter of
        // their frames or more) as of 60 to 120 s.
        let (lo, hi) = (f64::from(shortest).ln(), f64::from(longest).ln());
        let seconds = rng.random_range(lo..=hi).exp().round() as u32;
        (
            seconds.clamp(shortest, longest),
            f64::from(rng.random_range(0..=100u32)) / 100.0,
        )
    };
    let total = seconds * LONG_FPS;
    let first =
        ((f64::from(total - NEEDLE_FRAMES) * depth).round() as u32).min(total - NEEDLE_FRAMES);
    let (colour, shape) = (
        rng.random_range(0..COLOURS.len()),
        rng.random_range(0..SHAPES.len()),
    );
    let rel = format!("{dir}/{id}.mp4");
    let path = out.join(&rel);
    let mut spec = Spec::new(lw, lh, LONG_FPS);
    // A keyframe every 8 s, as in the benchmark's long videos.
    spec.gop = 8 * LONG_FPS;
    let frames = (0..total).map(|f| {
        let mut img = image::RgbImage::from_pixel(lw, lh, image::Rgb(LONG_GROUND));
        // A small grey dot wanders so that no two seconds look alike.
        // Each video's dot starts elsewhere: no two videos are the same.
        let phase = f as f32 / total as f32 * std::f32::consts::TAU * 3.0 + i as f32 * 0.9;
        let (dx, dy) = (
            lw as f32 * (0.5 + 0.4 * phase.cos()),
            lh as f32 * (0.5 + 0.4 * phase.sin()),
        );
        draw_shape(
            &mut img,
            "circle",
            dx,
            dy,
            lh as f32 * 0.06,
            [150, 150, 150],
        );
        if (first..first + NEEDLE_FRAMES).contains(&f) {
            draw_needle(&mut img, SHAPES[shape], COLOURS[colour].1);
        }
        (i64::from(f) * 1000 / i64::from(LONG_FPS), img.into_raw())
    });
    encode::write(&path, &spec, frames).map_err(|e| fail(&path, e))?;
    w.files.push(path);
    let [needle, others @ ..] = long_questions(COLOURS[colour].0, SHAPES[shape], depth);
    let mut qas = vec![needle.clone()];
    if !held_out {
        qas.push(others[rng.random_range(0..others.len())].clone());
        if rng.random_bool(0.5) {
            qas.swap(0, 1);
        }
    }
    for (_, question, answer) in &qas {
        w.corpus.push(format!("{question} {}.", capitalize(answer)));
    }
    w.long.push(VideoRecord {
        id: id.clone(),
        video: rel.clone(),
        fps: None,
        conversations: qa_turns(tokens::VIDEO, &qas),
    });
    let ms = |frame: u32| i64::from(frame) * 1000 / i64::from(LONG_FPS);
    w.needles.push(VideoNeedle {
        id,
        video: rel,
        depth,
        start_ms: ms(first),
        end_ms: ms(first + NEEDLE_FRAMES),
        duration_ms: ms(total),
        colour: COLOURS[colour].0.to_string(),
        shape: SHAPES[shape].to_string(),
        question: needle.1,
        answer: needle.2,
    });
    Ok(())
}
