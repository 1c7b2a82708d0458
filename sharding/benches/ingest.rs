//! Ingest throughput: image decode + resize + re-encode, and tokenization.
//!
//! `cargo bench -p lvpipe-sharding --bench ingest [-- DATA_DIR]`
//!
//! Writes its inputs to DATA_DIR (default `target/bench-data`) so the Python
//! peers in `benches/peers/` measure the same files: 1000 JPEGs of 640x480
//! (q90, textured so they weigh about what photos do) and the long documents
//! of `lvpipe synth --scale small`. Prints one JSON object per measurement.
//! Numbers are best of 3 runs; `/proc/loadavg` is printed with them.

// A benchmark reports its measurements on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{ImageFormat, Rgb, RgbImage};
use lvpipe_sharding::{ChatTokenizer, ImageAspect, ImageSettings, process_image};
use lvpipe_synth::{Scale, SynthSettings, synthesize};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

// The same allocator as the `lvpipe` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IMAGES: usize = 1000;

fn photo_like(rng: &mut SmallRng) -> Vec<u8> {
    let (w, h) = (640u32, 480u32);
    let base: [f32; 3] = [
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
        rng.random_range(0.0..255.0),
    ];
    let img = RgbImage::from_fn(w, h, |x, y| {
        let g = (x as f32 / w as f32) * 120.0 + (y as f32 / h as f32) * 60.0;
        let wave = ((x as f32 * 0.05).sin() * (y as f32 * 0.03).cos()) * 40.0;
        let px = |c: usize| {
            (base[c] * 0.5 + g + wave + ((x * 7 + y * 13 + c as u32 * 31) % 23) as f32)
                .clamp(0.0, 255.0) as u8
        };
        Rgb([px(0), px(1), px(2)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .unwrap();
    out
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, last.expect("runs > 0"))
}

fn main() {
    let data: PathBuf = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"));
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{{\"loadavg\": \"{}\", \"threads\": {}}}",
        loadavg.trim(),
        rayon::current_num_threads()
    );

    let images = prepare_images(&data.join("jpeg640"));
    let settings = ImageSettings {
        size: 384,
        aspect: ImageAspect::Resize,
        jpeg_quality: 90,
        ..Default::default()
    };
    let bytes: usize = images.iter().map(Vec::len).sum();
    // Where the time goes, one thread: decode alone, then decode + resize.
    let (decode, _) = best_of(3, || {
        images
            .iter()
            .map(|b| image::load_from_memory(b).unwrap().width())
            .sum::<u32>()
    });
    println!(
        "{{\"bench\": \"image decode only (zune-jpeg via image)\", \"threads\": 1, \"img_per_s\": {:.1}}}",
        images.len() as f64 / decode
    );
    let decoded: Vec<_> = images
        .iter()
        .take(200)
        .map(|b| image::load_from_memory(b).unwrap().into_rgb8())
        .collect();
    let (resize, small) = best_of(3, || {
        decoded
            .iter()
            .map(|img| {
                let src = fast_image_resize::images::Image::from_vec_u8(
                    640,
                    480,
                    img.as_raw().clone(),
                    fast_image_resize::PixelType::U8x3,
                )
                .unwrap();
                let mut dst = fast_image_resize::images::Image::new(
                    384,
                    384,
                    fast_image_resize::PixelType::U8x3,
                );
                let opts = fast_image_resize::ResizeOptions::new().resize_alg(
                    fast_image_resize::ResizeAlg::Convolution(
                        fast_image_resize::FilterType::Bilinear,
                    ),
                );
                fast_image_resize::Resizer::new()
                    .resize(&src, &mut dst, &opts)
                    .unwrap();
                dst.into_vec()
            })
            .collect::<Vec<_>>()
    });
    let (encode, _) = best_of(3, || {
        small
            .iter()
            .map(|px| {
                let image = turbojpeg::Image {
                    pixels: px.as_slice(),
                    width: 384,
                    pitch: 384 * 3,
                    height: 384,
                    format: turbojpeg::PixelFormat::RGB,
                };
                turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2)
                    .unwrap()
                    .len()
            })
            .sum::<usize>()
    });
    println!(
        "{{\"bench\": \"stage ms per image\", \"resize_ms\": {:.3}, \"encode_ms\": {:.3}}}",
        resize * 1e3 / 200.0,
        encode * 1e3 / 200.0
    );
    for threads in [1, rayon::current_num_threads()] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (secs, out) = best_of(3, || {
            pool.install(|| {
                images
                    .par_iter()
                    .map(|b| process_image(b, &settings).unwrap().bytes.len())
                    .sum::<usize>()
            })
        });
        println!(
            "{{\"bench\": \"image decode+resize(bilinear, 384x384)+jpeg q90\", \"threads\": {threads}, \"images\": {}, \"img_per_s\": {:.1}, \"input_mb\": {:.1}, \"output_mb\": {:.1}}}",
            images.len(),
            images.len() as f64 / secs,
            bytes as f64 / 1e6,
            out as f64 / 1e6
        );
    }

    let (tokenizer_path, docs) = prepare_text(&data.join("synth-small"));
    let tokenizer = ChatTokenizer::load(&tokenizer_path).unwrap();
    let text_bytes: usize = docs.iter().map(String::len).sum();
    for threads in [1, rayon::current_num_threads()] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (secs, tokens) = best_of(3, || {
            pool.install(|| {
                docs.par_iter()
                    .map(|d| tokenizer.encode(d).unwrap().len())
                    .sum::<usize>()
            })
        });
        println!(
            "{{\"bench\": \"tokenize (tokenizers encode_fast, synth BPE)\", \"threads\": {threads}, \"docs\": {}, \"mb_per_s\": {:.2}, \"tokens_per_s\": {:.0}, \"text_mb\": {:.1}}}",
            docs.len(),
            text_bytes as f64 / 1e6 / secs,
            tokens as f64 / secs,
            text_bytes as f64 / 1e6
        );
    }
}

fn prepare_images(dir: &Path) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = SmallRng::seed_from_u64(42);
    (0..IMAGES)
        .map(|i| {
            let path = dir.join(format!("{i:04}.jpg"));
            if let Ok(bytes) = std::fs::read(&path) {
                return bytes;
            }
            let bytes = photo_like(&mut rng);
            // Keep the format check honest: these must be real JPEGs.
            assert_eq!(image::guess_format(&bytes).unwrap(), ImageFormat::Jpeg);
            let _ = image::load(Cursor::new(&bytes), ImageFormat::Jpeg).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            bytes
        })
        .collect()
}

/// The long documents of the small synthetic corpus, also written one per
/// line to `docs.txt` for the Python peer.
fn prepare_text(dir: &Path) -> (PathBuf, Vec<String>) {
    if !dir.join("longdocs.jsonl").exists() {
        synthesize(&SynthSettings {
            out: dir.to_path_buf(),
            scale: Scale::Small,
            seed: 0,
        })
        .unwrap();
    }
    let docs: Vec<String> = std::fs::read_to_string(dir.join("longdocs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    std::fs::write(dir.join("docs.txt"), docs.join("\n") + "\n").unwrap();
    (dir.join("tokenizer.json"), docs)
}
