//! Video frame sampling with FFmpeg: which frames a policy asks for, and
//! decoding only what it takes to produce them.
//!
//! Targets are presentation times. The frame shown at time `t` is the last
//! frame whose timestamp is at most `t`, so variable-frame-rate files are
//! sampled by what a player shows, not by frame counting. For each target the
//! sampler either decodes forward from where it is, or, when a keyframe lies
//! between its position and the target, seeks to that keyframe: dense targets
//! decode sequentially, sparse ones cost about half a GOP each.

#[cfg(not(feature = "video"))]
use lvpipe_schemas::QuarantineReason;

#[cfg(feature = "video")]
mod decode;
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

pub use lvpipe_schemas::FramePolicy;

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
