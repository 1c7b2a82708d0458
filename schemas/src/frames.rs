//! Frame policies: which frames of a video become a sample's frames, as
//! `--frames`, registry files, recipes and evaluation write them.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

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
    /// Frames the policy asks for at most: `uniform:N` and `...max:N` give N.
    pub fn max_frames(&self) -> u32 {
        match *self {
            FramePolicy::Uniform { frames } => frames,
            FramePolicy::Fps { max, .. } | FramePolicy::Head { max, .. } => max,
        }
    }

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
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::UnknownValue {
            what: "frame policy",
            value: s.to_string(),
            expected: "uniform:N, fps:F,max:N, head:fps:F,max:N".to_string(),
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
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for FramePolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
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
}
