//! Video frame sampling throughput.
//!
//! `cargo bench -p lvpipe-sharding --bench video -- POLICY FILE...`
//!
//! Samples every FILE with POLICY (e.g. `uniform:32`) in exact and in
//! keyframe mode, first one video at a time on one thread (per-video
//! latency, comparable with `ffmpeg -threads 1`), then all files in
//! parallel on the rayon pool (videos/s). Frames are converted to RGB and
//! rotated as in a build; the JPEG encode is left out (it is the image
//! path's cost, measured by the `ingest` bench). Prints one JSON object per
//! measurement, best of 3, with `/proc/loadavg` and peak RSS.

// A benchmark reports its measurements on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::Instant;

use lvpipe_sharding::video::{FramePolicy, Hints, SeekMode, VideoSettings, sample};
use rayon::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (policy, files) = match args.split_first() {
        Some((p, files)) if !files.is_empty() => (p.parse::<FramePolicy>().unwrap(), files),
        _ => {
            eprintln!("usage: cargo bench --bench video -- POLICY FILE...");
            std::process::exit(2);
        }
    };
    let files: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
    for seek in [SeekMode::Exact, SeekMode::Keyframe] {
        let settings = VideoSettings {
            policy,
            seek,
            ..Default::default()
        };
        let one = |f: &PathBuf| {
            let s = sample(f, &settings, Hints::default())
                .unwrap_or_else(|(r, d)| panic!("{}: {r}: {d}", f.display()));
            (s.frames.len() as u64, s.decoded)
        };
        for (mode, parallel) in [
            ("1 thread, one video at a time", false),
            ("rayon, all videos", true),
        ] {
            let mut best = f64::INFINITY;
            let (mut frames, mut decoded) = (0, 0);
            for _ in 0..3 {
                let t = Instant::now();
                let counts: Vec<(u64, u64)> = if parallel {
                    files.par_iter().map(one).collect()
                } else {
                    files.iter().map(one).collect()
                };
                best = best.min(t.elapsed().as_secs_f64());
                frames = counts.iter().map(|c| c.0).sum();
                decoded = counts.iter().map(|c| c.1).sum();
            }
            println!(
                "{}",
                serde_json::json!({
                    "bench": "video_sample",
                    "policy": policy.to_string(),
                    "seek": format!("{seek:?}").to_lowercase(),
                    "mode": mode,
                    "threads": if parallel { rayon::current_num_threads() } else { 1 },
                    "videos": files.len(),
                    "seconds": (best * 1000.0).round() / 1000.0,
                    "ms_per_video": (best / files.len() as f64 * 1e4).round() / 10.0,
                    "videos_per_s": (files.len() as f64 / best * 100.0).round() / 100.0,
                    "frames_per_s": (frames as f64 / best).round(),
                    "frames_decoded": decoded,
                    "peak_rss_mb": peak_rss_mb().round(),
                    "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
                })
            );
        }
    }
}
