//! Video frame sampling with FFmpeg: which frames a policy asks for, and
//! decoding only what it takes to produce them.
//!
//! Targets are presentation times. The frame shown at time `t` is the last
//! frame whose timestamp is at most `t`, so variable-frame-rate files are
//! sampled by what a player shows, not by frame counting. For each target the
//! sampler either decodes forward from where it is, or, when a keyframe lies
//! between its position and the target, seeks to that keyframe: dense targets
//! decode sequentially, sparse ones cost about half a GOP each.

use std::fmt;
use std::str::FromStr;

#[cfg(not(feature = "video"))]
use lvpipe_schemas::QuarantineReason;

#[cfg(feature = "video")]
mod decode;
#[cfg(feature = "video")]
pub mod encode;
#[cfg(feature = "video")]
pub use decode::sample;

/// Without FFmpeg (the `video` feature off), every video is quarantined.
#[cfg(not(feature = "video"))]
pub fn sample(
    _path: &std::path::Path,
    _settings: &VideoSettings,
    _hints: Hints,
) -> Result<Sampled, (QuarantineReason, String)> {
    Err((
        QuarantineReason::UnsupportedMedia,
        "this lvpipe was built without FFmpeg (the `video` feature)".into(),
    ))
}

/// Which frames of a video become the sample's frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FramePolicy {
    /// `uniform:N`: N frames spread evenly from the first to the last frame
    /// (VILA's `linspace` over the video).
    Uniform { frames: u32 },
    /// `fps:F,max:N`: LongVILA's rule, min(N, F x duration) frames (at least
    /// one) spread evenly over the whole video.
    Fps { fps: f64, max: u32 },
    /// `head:fps:F,max:N`: the newer VILA loader's rule, frames every 1/F
    /// seconds from the start, at most N: only the first N/F seconds.
    Head { fps: f64, max: u32 },
}

impl FramePolicy {
    /// Target times in seconds from the first frame, ascending, for a video
    /// of `duration` seconds whose last frame starts at `last`.
    pub fn targets(&self, duration: f64, last: f64) -> Vec<f64> {
        let spread = |n: u32| -> Vec<f64> {
            match n {
                0 => vec![],
                1 => vec![last / 2.0],
                n => (0..n)
                    .map(|i| last * f64::from(i) / f64::from(n - 1))
                    .collect(),
            }
        };
        match *self {
            FramePolicy::Uniform { frames } => spread(frames),
            FramePolicy::Fps { fps, max } => {
                spread(((fps * duration).floor() as u32).clamp(1, max.max(1)))
            }
            FramePolicy::Head { fps, max } => {
                let n = ((fps * duration).ceil() as u32).clamp(1, max.max(1));
                (0..n)
                    .map(|i| f64::from(i) / fps)
                    .filter(|&t| t <= last)
                    .collect()
            }
        }
    }
}

impl fmt::Display for FramePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramePolicy::Uniform { frames } => write!(f, "uniform:{frames}"),
            FramePolicy::Fps { fps, max } => write!(f, "fps:{fps},max:{max}"),
            FramePolicy::Head { fps, max } => write!(f, "head:fps:{fps},max:{max}"),
        }
    }
}

impl FromStr for FramePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("frame policy `{s}`: expected `uniform:N`, `fps:F,max:N` or `head:fps:F,max:N`")
        };
        let count = |v: &str| v.parse::<u32>().ok().filter(|&n| n > 0);
        let rate = |v: &str| v.parse::<f64>().ok().filter(|f| f.is_finite() && *f > 0.0);
        let fps_max = |rest: &str| -> Option<(f64, u32)> {
            let (fps, max) = rest.split_once(",max:")?;
            Some((rate(fps)?, count(max)?))
        };
        if let Some(n) = s.strip_prefix("uniform:") {
            return count(n)
                .map(|frames| FramePolicy::Uniform { frames })
                .ok_or_else(bad);
        }
        if let Some(rest) = s.strip_prefix("head:fps:") {
            let (fps, max) = fps_max(rest).ok_or_else(bad)?;
            return Ok(FramePolicy::Head { fps, max });
        }
        if let Some(rest) = s.strip_prefix("fps:") {
            let (fps, max) = fps_max(rest).ok_or_else(bad)?;
            return Ok(FramePolicy::Fps { fps, max });
        }
        Err(bad())
    }
}

impl serde::Serialize for FramePolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How exactly targets are hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeekMode {
    /// The frame shown at each target time (decodes from the keyframe before it).
    #[default]
    Exact,
    /// The keyframe nearest each target, its real timestamp recorded: one
    /// keyframe decoded per target, much faster, approximate.
    Keyframe,
}

/// What to do with a video that yields fewer distinct frames than its policy asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShortVideos {
    /// Keep the frames that decode.
    #[default]
    Keep,
    /// Quarantine the sample as `too_few_frames`.
    Quarantine,
}

/// Video settings of a build; frames are then stored like images.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct VideoSettings {
    pub policy: FramePolicy,
    pub seek: SeekMode,
    pub short: ShortVideos,
    /// Largest width x height accepted.
    pub max_pixels: u64,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            policy: FramePolicy::Uniform { frames: 8 },
            seek: SeekMode::Exact,
            short: ShortVideos::Keep,
            // 8K UHD.
            max_pixels: 7680 * 4320,
        }
    }
}

/// One sampled frame, upright, as packed RGB.
#[derive(Debug, Clone)]
pub struct Frame {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Position in the stream, from the timestamp at the average frame rate.
    pub index: u32,
    /// Presentation time from the first frame.
    pub timestamp_ms: i64,
}

/// What sampling a video produced.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub frames: Vec<Frame>,
    pub duration_ms: i64,
    pub fps: f64,
    pub codec: String,
    /// Width and height as stored in the file (before rotation).
    pub width: u32,
    pub height: u32,
    /// Clockwise rotation applied to display the frames upright (0, 90, 180, 270).
    pub rotation: u32,
    /// Frames the decoder produced, for benchmarks.
    pub decoded: u64,
}

/// Optional hints from the annotation (`fps`, `frame_count`), used when the
/// container does not give a duration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hints {
    pub fps: Option<f64>,
    pub frame_count: Option<u64>,
}

#[cfg_attr(not(feature = "video"), allow(dead_code))]
fn normalize_rotation(clockwise: f64) -> u32 {
    let r = (clockwise / 90.0).round() as i64 * 90;
    r.rem_euclid(360) as u32
}

#[cfg_attr(not(feature = "video"), allow(dead_code))]
/// Rotates packed RGB clockwise by 0, 90, 180 or 270 degrees.
fn rotate(rgb: Vec<u8>, w: u32, h: u32, clockwise: u32) -> (Vec<u8>, u32, u32) {
    let (w, h) = (w as usize, h as usize);
    let px = |x: usize, y: usize| &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
    match clockwise {
        90 => {
            let mut out = Vec::with_capacity(rgb.len());
            for y in 0..w {
                for x in 0..h {
                    out.extend_from_slice(px(y, h - 1 - x));
                }
            }
            (out, h as u32, w as u32)
        }
        180 => {
            let mut out = Vec::with_capacity(rgb.len());
            for y in (0..h).rev() {
                for x in (0..w).rev() {
                    out.extend_from_slice(px(x, y));
                }
            }
            (out, w as u32, h as u32)
        }
        270 => {
            let mut out = Vec::with_capacity(rgb.len());
            for y in 0..w {
                for x in 0..h {
                    out.extend_from_slice(px(w - 1 - y, x));
                }
            }
            (out, h as u32, w as u32)
        }
        _ => (rgb, w as u32, h as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for s in [
            "uniform:16",
            "fps:2,max:64",
            "head:fps:1,max:32",
            "fps:0.5,max:8",
        ] {
            assert_eq!(s.parse::<FramePolicy>().unwrap().to_string(), s);
        }
        for bad in [
            "uniform:0",
            "uniform:x",
            "fps:2",
            "fps:-1,max:3",
            "head:2,max:3",
            "",
        ] {
            assert!(bad.parse::<FramePolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_follow_longvila_and_vila() {
        // 10 s at 10 fps: last frame at 9.9 s.
        let uniform = FramePolicy::Uniform { frames: 4 }.targets(10.0, 9.9);
        assert_eq!(uniform.len(), 4);
        assert!((uniform[0] - 0.0).abs() < 1e-9 && (uniform[3] - 9.9).abs() < 1e-9);
        // min(N, F x duration): 2 fps over 10 s = 20, capped at 8; a short
        // video gets fewer.
        assert_eq!(
            FramePolicy::Fps { fps: 2.0, max: 8 }
                .targets(10.0, 9.9)
                .len(),
            8
        );
        assert_eq!(
            FramePolicy::Fps { fps: 2.0, max: 64 }
                .targets(10.0, 9.9)
                .len(),
            20
        );
        // head: every 1/F s from the start.
        let head = FramePolicy::Head { fps: 1.0, max: 4 }.targets(100.0, 99.9);
        assert_eq!(head, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn rotation_turns_clockwise() {
        // 2x1: red, green.
        let rgb = vec![255, 0, 0, 0, 255, 0];
        let (out, w, h) = rotate(rgb.clone(), 2, 1, 90);
        assert_eq!((w, h), (1, 2));
        assert_eq!(out, vec![255, 0, 0, 0, 255, 0]);
        let (out, ..) = rotate(rgb.clone(), 2, 1, 270);
        assert_eq!(out, vec![0, 255, 0, 255, 0, 0]);
        let (out, ..) = rotate(rgb, 2, 1, 180);
        assert_eq!(out, vec![0, 255, 0, 255, 0, 0]);
        assert_eq!(normalize_rotation(-90.0), 270);
    }
}
