//! Video sources end to end: synth videos -> build-shards -> the frames each
//! policy asks for, at the right times; variable frame rate, rotation and odd
//! pixel formats; bad files quarantined with the good ones kept.
#![cfg(feature = "video")]

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, UInt32Type};

use lvpipe_schemas::QuarantineReason;
use lvpipe_sharding::video::{FramePolicy, Hints, SeekMode, ShortVideos, VideoSettings, sample};
use lvpipe_sharding::{BuildSettings, ImageSettings, SourceKind, SourceSpec, build_shards};
use lvpipe_synth::encode::{self, Codec, Pixel, Spec};
use lvpipe_synth::{Answers, Scale, SynthSettings, synthesize};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn read_parts(dir: &Path, prefix: &str) -> Vec<RecordBatch> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with(prefix) && name.ends_with(".parquet")
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
        })
        .collect()
}

/// One stored video sample: its annotation id, duration and frames as
/// (timestamp ms, decoded JPEG).
struct VideoRow {
    id: String,
    duration_ms: i64,
    num_frames: u32,
    frames: Vec<(i64, image::RgbImage)>,
}

fn video_rows(shards: &Path, source: &str) -> Vec<VideoRow> {
    let mut out = Vec::new();
    for b in read_parts(shards, "samples-") {
        let sources = b.column_by_name("source").unwrap().as_string::<i32>();
        let ids = b
            .column_by_name("annotation_id")
            .unwrap()
            .as_string::<i32>();
        let durations = b
            .column_by_name("duration_ms")
            .unwrap()
            .as_primitive::<Int64Type>();
        let counts = b
            .column_by_name("num_frames")
            .unwrap()
            .as_primitive::<UInt32Type>();
        let media = b.column_by_name("media").unwrap().as_list::<i32>();
        for r in 0..b.num_rows() {
            if sources.value(r) != source {
                continue;
            }
            let items = media.value(r);
            let items = items.as_struct();
            let bytes = items.column_by_name("bytes").unwrap().as_binary::<i32>();
            let ts = items
                .column_by_name("timestamp_ms")
                .unwrap()
                .as_primitive::<Int64Type>();
            let frames = (0..items.len())
                .map(|i| {
                    let img = image::load_from_memory(bytes.value(i)).unwrap().into_rgb8();
                    (ts.value(i), img)
                })
                .collect();
            out.push(VideoRow {
                id: ids.value(r).to_string(),
                duration_ms: durations.value(r),
                num_frames: counts.value(r),
                frames,
            });
        }
    }
    out
}

/// Whether the centre of a frame shows a saturated colour (the needle),
/// rather than the long videos' grey background.
fn needle_at_centre(img: &image::RgbImage) -> bool {
    let p = img.get_pixel(img.width() / 2, img.height() / 2).0;
    let (max, min) = (*p.iter().max().unwrap(), *p.iter().min().unwrap());
    max - min > 80
}

fn build(raw: &Path, out: &Path, sources: Vec<SourceSpec>, video: VideoSettings) {
    let mut settings = BuildSettings::new(out, raw.join("tokenizer.json")).with_sources(sources);
    settings.image = ImageSettings {
        size: 64,
        ..Default::default()
    };
    settings.video = video;
    build_shards(&settings, &|_| {}).unwrap();
}

fn longvideo_source(raw: &Path, frames: &str) -> SourceSpec {
    let mut spec = SourceSpec::parse(
        &format!("longvideo=llava:{}", raw.join("longvideo.json").display()),
        None,
    )
    .unwrap();
    spec.frames = Some(frames.to_string());
    spec
}

#[test]
fn synth_long_videos_sample_by_policy_with_the_needle_where_covered() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    synthesize(&SynthSettings {
        out: raw.clone(),
        scale: Scale::Tiny,
        seed: 3,
    })
    .unwrap();
    let answers: Answers =
        serde_json::from_slice(&std::fs::read(raw.join("answers.json")).unwrap()).unwrap();
    assert!(!answers.video_needles.is_empty());
    let frame_ms = 250; // synth's long videos run at 4 fps.

    for (i, policy) in [
        "uniform:16",
        "fps:2,max:64",
        "head:fps:1,max:32",
        "fps:1,max:128",
    ]
    .into_iter()
    .enumerate()
    {
        let shards = dir.path().join(format!("shards-{i}"));
        build(
            &raw,
            &shards,
            vec![longvideo_source(&raw, policy)],
            VideoSettings::default(),
        );
        let rows = video_rows(&shards, "longvideo");
        assert_eq!(rows.len(), answers.video_needles.len(), "{policy}");
        let parsed: FramePolicy = policy.parse().unwrap();
        for row in rows {
            let needle = answers
                .video_needles
                .iter()
                .find(|n| n.id == row.id)
                .unwrap();
            assert_eq!(row.duration_ms, needle.duration_ms);
            // The targets the policy names; each frame is the one shown then.
            let duration = needle.duration_ms as f64 / 1000.0;
            let last = duration - frame_ms as f64 / 1000.0;
            let targets = parsed.targets(duration, last);
            assert_eq!(row.num_frames as usize, targets.len(), "{policy}");
            assert_eq!(row.frames.len(), targets.len(), "{policy}");
            for ((ts, img), t) in row.frames.iter().zip(&targets) {
                let shown = ((t * 1000.0).round() as i64) / frame_ms * frame_ms;
                assert_eq!(*ts, shown, "{policy} {}: target {t}", row.id);
                assert!(*ts >= 0 && *ts < row.duration_ms);
                let in_needle = (needle.start_ms..needle.end_ms).contains(ts);
                assert_eq!(
                    needle_at_centre(img),
                    in_needle,
                    "{policy} {}: frame at {ts} ms, needle {}..{}",
                    row.id,
                    needle.start_ms,
                    needle.end_ms
                );
            }
            assert!(row.frames.windows(2).all(|w| w[0].0 < w[1].0));
            // Sampling at least every 2 s (the needle's length) must catch it.
            let stride_ms = (last * 1000.0) / (targets.len() as f64 - 1.0);
            if policy.starts_with("head") {
                let covered = needle.start_ms < (targets.len() as i64) * 1000;
                assert_eq!(row.frames.iter().any(|f| needle_at_centre(&f.1)), covered);
            } else if stride_ms <= 2000.0 {
                assert!(
                    row.frames.iter().any(|f| needle_at_centre(&f.1)),
                    "{policy} {}",
                    row.id
                );
            }
        }
    }
}

/// Frame `i` shows `i` as 8 vertical black/white bars (bit 7 first).
fn coded_frame(i: u32, w: u32, h: u32) -> Vec<u8> {
    let mut img = image::RgbImage::new(w, h);
    for (x, _, p) in img.enumerate_pixels_mut() {
        let bit = (i >> (7 - (x * 8 / w))) & 1;
        let v = if bit == 1 { 255 } else { 0 };
        *p = image::Rgb([v, v, v]);
    }
    img.into_raw()
}

fn read_code(rgb: &[u8], w: u32, h: u32) -> u32 {
    (0..8).fold(0, |acc, b| {
        let x = b * w / 8 + w / 16;
        let p = rgb[((h / 2 * w + x) * 3) as usize];
        (acc << 1) | u32::from(p > 127)
    })
}

#[test]
fn variable_frame_rate_samples_by_presentation_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vfr.mp4");
    let (w, h) = (128, 32);
    // Bursts of 25 fps and long holds: frame i shows i from pts[i].
    let gaps = [40, 40, 40, 400, 40, 1000, 40, 40, 200, 40];
    let mut pts = vec![0i64];
    for i in 0..59 {
        pts.push(pts[i] + gaps[i % gaps.len()]);
    }
    let mut spec = Spec::new(w, h, 25);
    spec.gop = 12;
    encode::write(
        &path,
        &spec,
        pts.iter()
            .enumerate()
            .map(|(i, &t)| (t, coded_frame(i as u32, w, h))),
    )
    .unwrap();
    for seek in [SeekMode::Exact] {
        let settings = VideoSettings {
            policy: FramePolicy::Uniform { frames: 12 },
            seek,
            ..Default::default()
        };
        let sampled = sample(&path, &settings, Hints::default()).unwrap();
        let duration = sampled.duration_ms as f64 / 1000.0;
        let last = duration - 1.0 / sampled.fps;
        let targets = FramePolicy::Uniform { frames: 12 }.targets(duration, last);
        let mut expected: Vec<usize> = targets
            .iter()
            .map(|t| pts.partition_point(|&p| p as f64 <= t * 1000.0 + 0.5) - 1)
            .collect();
        expected.dedup();
        let got: Vec<usize> = sampled
            .frames
            .iter()
            .map(|f| read_code(&f.rgb, f.width, f.height) as usize)
            .collect();
        assert_eq!(got, expected, "targets {targets:?}");
        for f in &sampled.frames {
            let i = read_code(&f.rgb, f.width, f.height) as usize;
            assert_eq!(f.timestamp_ms, pts[i], "frame {i}");
        }
    }
}

#[test]
fn keyframe_mode_snaps_to_keyframes_and_records_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.mp4");
    let (w, h) = (128, 32);
    let mut spec = Spec::new(w, h, 10);
    spec.gop = 10; // a keyframe every second
    encode::write(
        &path,
        &spec,
        (0..100).map(|i| (i64::from(i) * 100, coded_frame(i, w, h))),
    )
    .unwrap();
    let settings = VideoSettings {
        policy: FramePolicy::Uniform { frames: 5 },
        seek: SeekMode::Keyframe,
        ..Default::default()
    };
    let sampled = sample(&path, &settings, Hints::default()).unwrap();
    assert!(!sampled.frames.is_empty());
    for f in &sampled.frames {
        let i = read_code(&f.rgb, f.width, f.height);
        assert_eq!(i % 10, 0, "frame {i} is not a keyframe");
        assert_eq!(f.timestamp_ms, i64::from(i) * 100);
    }
    // Fewer frames decoded than an exact pass over the same targets.
    let exact = sample(
        &path,
        &VideoSettings {
            seek: SeekMode::Exact,
            ..settings
        },
        Hints::default(),
    )
    .unwrap();
    assert!(
        sampled.decoded < exact.decoded,
        "{} vs {}",
        sampled.decoded,
        exact.decoded
    );
}

#[test]
fn rotation_and_odd_pixel_formats_come_out_upright_rgb() {
    let dir = tempfile::tempdir().unwrap();
    // Left half red, right half blue; displayed rotated 90 degrees clockwise.
    let (w, h) = (64, 32);
    let mut img = image::RgbImage::new(w, h);
    for (x, _, p) in img.enumerate_pixels_mut() {
        *p = if x < w / 2 {
            image::Rgb([230, 20, 20])
        } else {
            image::Rgb([20, 20, 230])
        };
    }
    let path = dir.path().join("rotated.mp4");
    let mut spec = Spec::new(w, h, 10);
    spec.rotate = 90;
    encode::write(
        &path,
        &spec,
        (0..10).map(|i| (i * 100, img.clone().into_raw())),
    )
    .unwrap();
    let s = sample(&path, &VideoSettings::default(), Hints::default()).unwrap();
    assert_eq!(s.rotation, 90);
    let f = &s.frames[0];
    assert_eq!((f.width, f.height), (h, w));
    let px = |x: u32, y: u32| &f.rgb[((y * f.width + x) * 3) as usize..][..3];
    assert!(
        px(f.width / 2, 4)[0] > 150,
        "top should be red: {:?}",
        px(f.width / 2, 4)
    );
    assert!(
        px(f.width / 2, f.height - 4)[2] > 150,
        "bottom should be blue"
    );

    // 4:4:4 at odd sizes, in 8 and 10 bits, converts to the same colours.
    for pixel in [Pixel::YUV444P, Pixel::YUV444P10LE, Pixel::YUV420P10LE] {
        let (w, h) = if pixel == Pixel::YUV420P10LE {
            (34, 18)
        } else {
            (33, 17)
        };
        let path = dir.path().join(format!("{pixel:?}.mp4"));
        let mut spec = Spec::new(w, h, 10);
        spec.pixel = pixel;
        let green = image::RgbImage::from_pixel(w, h, image::Rgb([30, 200, 60])).into_raw();
        encode::write(&path, &spec, (0..5).map(|i| (i * 100, green.clone())))
            .unwrap_or_else(|e| panic!("{pixel:?}: {e}"));
        let s = sample(&path, &VideoSettings::default(), Hints::default()).unwrap();
        let f = &s.frames[0];
        assert_eq!((f.width, f.height), (w, h), "{pixel:?}");
        let c = &f.rgb[((h / 2 * w + w / 2) * 3) as usize..][..3];
        assert!(
            c[1] > 170 && c[0] < 70 && c[2] < 100,
            "{pixel:?}: centre {c:?}"
        );
    }
}

fn wav(path: &Path) {
    // One second of 8 kHz mono silence: a valid file with no video stream.
    let data = vec![0u8; 16000];
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&16000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn bad_videos_are_quarantined_and_the_good_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    synthesize(&SynthSettings {
        out: raw.clone(),
        scale: Scale::Tiny,
        seed: 5,
    })
    .unwrap();
    let videos = raw.join("videos");
    let good = std::fs::read(videos.join("clip-00000.mp4")).unwrap();
    // MP4 keeps its index at the end: half a file cannot be opened.
    std::fs::write(videos.join("truncated.mp4"), &good[..good.len() / 2]).unwrap();
    std::fs::write(videos.join("empty.mp4"), b"").unwrap();
    std::fs::write(videos.join("notes.mp4"), b"not a video at all").unwrap();
    wav(&videos.join("audio-only.mp4"));
    // Matroska streams: a truncated WebM decodes up to where it ends.
    let (w, h) = (64, 48);
    let mut spec = Spec::new(w, h, 10);
    spec.codec = if Codec::Vp9.available() {
        Codec::Vp9
    } else {
        Codec::H264
    };
    let long = videos.join("cut.mkv");
    encode::write(
        &long,
        &spec,
        (0..100).map(|i| (i64::from(i) * 100, coded_frame(i, w, h))),
    )
    .unwrap();
    let bytes = std::fs::read(&long).unwrap();
    std::fs::write(videos.join("cut-short.mkv"), &bytes[..bytes.len() / 3]).unwrap();

    let mut records: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(raw.join("video_sft.json")).unwrap()).unwrap();
    let good_ids: Vec<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    for (id, file) in [
        ("bad-missing", "videos/nowhere.mp4"),
        ("bad-truncated", "videos/truncated.mp4"),
        ("bad-empty", "videos/empty.mp4"),
        ("bad-text", "videos/notes.mp4"),
        ("bad-audio", "videos/audio-only.mp4"),
        ("bad-short", "videos/cut-short.mkv"),
    ] {
        // Interleave bad records with the good ones.
        let at = records.len() / 2;
        records.insert(
            at,
            serde_json::json!({"id": id, "video": file, "conversations": [
                {"from": "human", "value": "<video>\nWhat is it?"},
                {"from": "gpt", "value": "Nothing."}]}),
        );
    }
    let file = raw.join("mixed.json");
    std::fs::write(&file, serde_json::to_vec(&records).unwrap()).unwrap();
    let shards = dir.path().join("shards");
    let source = SourceSpec {
        name: "mixed".into(),
        kind: SourceKind::Llava,
        path: file,
        media_root: Some(raw.clone()),
        frames: Some("uniform:16".into()),
    };
    build(
        &raw,
        &shards,
        vec![source],
        VideoSettings {
            short: ShortVideos::Quarantine,
            ..Default::default()
        },
    );
    let rows = video_rows(&shards, "mixed");
    let mut kept: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    kept.sort();
    assert_eq!(kept, good_ids, "every good video is kept");
    // Short clips have 30 frames: uniform:16 takes 16 distinct ones.
    assert!(rows.iter().all(|r| r.num_frames == 16));

    let mut reasons = std::collections::BTreeMap::new();
    for b in read_parts(&shards, "quarantine-") {
        let ids = b
            .column_by_name("annotation_id")
            .unwrap()
            .as_string::<i32>();
        let reason = b.column_by_name("reason").unwrap().as_string::<i32>();
        let detail = b.column_by_name("detail").unwrap().as_string::<i32>();
        for r in 0..b.num_rows() {
            reasons.insert(
                ids.value(r).to_string(),
                (reason.value(r).to_string(), detail.value(r).to_string()),
            );
        }
    }
    let expect = [
        ("bad-missing", QuarantineReason::MissingMedia),
        ("bad-truncated", QuarantineReason::CorruptMedia),
        ("bad-empty", QuarantineReason::CorruptMedia),
        ("bad-text", QuarantineReason::CorruptMedia),
        ("bad-audio", QuarantineReason::NoVideoStream),
        ("bad-short", QuarantineReason::TooFewFrames),
    ];
    for (id, reason) in expect {
        let (got, detail) = reasons
            .get(id)
            .unwrap_or_else(|| panic!("{id} not quarantined"));
        assert_eq!(got, reason.as_str(), "{id}: {detail}");
        assert!(detail.contains("video `videos/"), "{id}: {detail}");
    }
    assert!(reasons["bad-empty"].1.contains("zero-byte"));
    assert!(
        reasons["bad-short"].1.contains("of the 16"),
        "{}",
        reasons["bad-short"].1
    );
    assert_eq!(reasons.len(), expect.len());

    // With `keep`, the cut video keeps the frames that decode.
    let frames = sample(
        &videos.join("cut-short.mkv"),
        &VideoSettings {
            policy: FramePolicy::Uniform { frames: 16 },
            ..Default::default()
        },
        Hints::default(),
    )
    .unwrap();
    assert!(!frames.frames.is_empty() && frames.frames.len() < 16);
    // A frame limit quarantines big videos.
    let err = sample(
        &videos.join("clip-00000.mp4"),
        &VideoSettings {
            max_pixels: 100,
            ..Default::default()
        },
        Hints::default(),
    )
    .unwrap_err();
    assert_eq!(err.0, QuarantineReason::MediaTooLarge);
}

#[test]
fn raw_streams_without_a_duration_use_the_annotation_hints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.h264");
    let (w, h) = (128, 32);
    encode::write(
        &path,
        &Spec::new(w, h, 10),
        (0..30).map(|i| (i64::from(i) * 100, coded_frame(i, w, h))),
    )
    .unwrap();
    let settings = VideoSettings {
        policy: FramePolicy::Uniform { frames: 4 },
        ..Default::default()
    };
    match sample(&path, &settings, Hints::default()) {
        Err((reason, _)) => assert_eq!(reason, QuarantineReason::UnknownDuration),
        // FFmpeg may estimate it; then it must be about 3 s.
        Ok(s) => assert!((2500..=3500).contains(&s.duration_ms), "{}", s.duration_ms),
    }
    let hinted = sample(
        &path,
        &settings,
        Hints {
            fps: Some(10.0),
            frame_count: Some(30),
        },
    )
    .unwrap();
    assert_eq!(hinted.frames.len(), 4);
}
