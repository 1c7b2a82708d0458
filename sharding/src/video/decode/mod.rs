//! Decoding with FFmpeg: open, pick targets, seek or decode forward, convert.

use std::path::Path;
use std::sync::Once;

use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;
use lvpipe_schemas::QuarantineReason;

use super::{
    Frame, Hints, Sampled, SeekMode, ShortVideos, VideoSettings, normalize_rotation, rotate,
};

type Reject = (QuarantineReason, String);

/// A keyframe of the container's index.
#[derive(Debug, Clone, Copy)]
struct Keyframe {
    /// Decode timestamp, as the index has it; seeking goes by it.
    dts: i64,
    /// Presentation timestamp, once a seek has decoded it.
    pts: Option<i64>,
}

/// Where the sampler left the frame that answers a target.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Held,
    Pending,
}

fn stamp(frame: &ff::frame::Video) -> Option<i64> {
    frame.timestamp().or(frame.pts())
}

pub(super) fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Registration is a no-op on FFmpeg >= 4; the log level keeps FFmpeg
        // from printing over the progress bar: problems come back as
        // quarantine details instead.
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
    });
}

/// Samples `path` by `settings`. Bad files come back as a quarantine reason
/// and a detail that says what was found.
pub fn sample(path: &Path, settings: &VideoSettings, hints: Hints) -> Result<Sampled, Reject> {
    init();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((
                QuarantineReason::MissingMedia,
                format!("{} not found", path.display()),
            ));
        }
        Err(e) => return Err((QuarantineReason::CorruptMedia, e.to_string())),
        Ok(m) if m.len() == 0 => {
            return Err((QuarantineReason::CorruptMedia, "zero-byte file".into()));
        }
        Ok(_) => {}
    }
    let input = ff::format::input(&path).map_err(|e| {
        (
            QuarantineReason::CorruptMedia,
            format!("FFmpeg cannot open it: {e} (truncated or not a video)"),
        )
    })?;
    Sampler::open(input, settings, hints)?.run(settings)
}

mod seek;

struct Sampler {
    input: ff::format::context::Input,
    decoder: ff::decoder::Video,
    stream: usize,
    time_base: f64,
    /// Timestamp of the first frame, in stream units.
    start: i64,
    /// Keyframes from the container's index, by decode time.
    keyframes: Vec<Keyframe>,
    duration: f64,
    fps: f64,
    codec: String,
    rotation: u32,
    scaler: Option<(Pixel, u32, u32, scaling::Context)>,
    /// The last decoded frame at or before the current target.
    held: Option<ff::frame::Video>,
    /// A decoded frame past the current target, kept for the next one.
    pending: Option<ff::frame::Video>,
    /// Decode time of the first packet read after the last seek: the
    /// keyframe the demuxer landed on.
    landed: Option<i64>,
    /// The target being decoded towards (exact mode), and the latest
    /// presentation time at or before it among the packets sent since the
    /// last seek: together they tell which frames need no decoding.
    goal: Option<i64>,
    max_sent: Option<i64>,
    /// Timestamp of the newest decoded frame; `None` before the first.
    position: Option<i64>,
    eof: bool,
    decoded: u64,
}

impl Sampler {
    fn open(
        input: ff::format::context::Input,
        settings: &VideoSettings,
        hints: Hints,
    ) -> Result<Self, Reject> {
        let Some(stream) = input.streams().best(ff::media::Type::Video) else {
            let found: Vec<String> = input
                .streams()
                .map(|s| format!("{:?}", s.parameters().medium()).to_lowercase())
                .collect();
            return Err((
                QuarantineReason::NoVideoStream,
                format!("no video stream (streams: [{}])", found.join(", ")),
            ));
        };
        let params = stream.parameters();
        let codec = params.id().name().to_string();
        let decoder = ff::codec::context::Context::from_parameters(params)
            .and_then(|c| c.decoder().video())
            .map_err(|e| {
                (
                    QuarantineReason::UnsupportedCodec,
                    format!("no decoder for codec `{codec}` in this FFmpeg: {e}"),
                )
            })?;
        let (w, h) = (decoder.width(), decoder.height());
        if w == 0 || h == 0 {
            return Err((
                QuarantineReason::CorruptMedia,
                format!("video stream of size {w}x{h}"),
            ));
        }
        if u64::from(w) * u64::from(h) > settings.max_pixels {
            return Err((
                QuarantineReason::MediaTooLarge,
                format!(
                    "{w}x{h} = {} pixels, over the limit of {}",
                    u64::from(w) * u64::from(h),
                    settings.max_pixels
                ),
            ));
        }
        let tb = stream.time_base();
        let time_base = f64::from(tb.numerator()) / f64::from(tb.denominator().max(1));
        let rate = |r: ff::Rational| {
            (r.denominator() != 0 && r.numerator() > 0)
                .then(|| f64::from(r.numerator()) / f64::from(r.denominator()))
        };
        let fps = rate(stream.avg_frame_rate())
            .or_else(|| rate(stream.rate()))
            .or(hints.fps)
            .unwrap_or(0.0);
        let start = match stream.start_time() {
            ff::ffi::AV_NOPTS_VALUE => 0,
            t => t,
        };
        let duration = if stream.duration() > 0 && stream.duration() != ff::ffi::AV_NOPTS_VALUE {
            stream.duration() as f64 * time_base
        } else if input.duration() > 0 {
            input.duration() as f64 / f64::from(ff::ffi::AV_TIME_BASE)
        } else if let (Some(n), true) = (hints.frame_count, fps > 0.0) {
            n as f64 / fps
        } else {
            0.0
        };
        if !(duration.is_finite() && duration > 0.0) {
            return Err((
                QuarantineReason::UnknownDuration,
                "the container gives no duration and the annotation no `frame_count`/`fps`".into(),
            ));
        }
        let rotation = rotation_of(&stream);
        let keyframes = index::keyframes(&stream)
            .into_iter()
            .map(|dts| Keyframe { dts, pts: None })
            .collect();
        let index = stream.index();
        Ok(Sampler {
            input,
            decoder,
            stream: index,
            time_base,
            start,
            keyframes,
            duration,
            fps,
            codec,
            rotation,
            scaler: None,
            held: None,
            pending: None,
            position: None,
            landed: None,
            goal: None,
            max_sent: None,
            eof: false,
            decoded: 0,
        })
    }

    fn run(mut self, settings: &VideoSettings) -> Result<Sampled, Reject> {
        let frame_len = if self.fps > 0.0 { 1.0 / self.fps } else { 0.0 };
        let last = (self.duration - frame_len).max(0.0);
        let targets = settings.policy.targets(self.duration, last);
        let asked = targets.len();
        let mut frames: Vec<Frame> = Vec::with_capacity(asked);
        for &t in &targets {
            let target = self.start + (t / self.time_base).round() as i64;
            let found = match settings.seek {
                SeekMode::Exact => self.exact(target)?,
                SeekMode::Keyframe => self.nearest_keyframe(target)?,
            };
            let Some(slot) = found else { break };
            let frame = match slot {
                Slot::Held => self.held.take(),
                Slot::Pending => self.pending.take(),
            }
            .expect("the slot exact() named");
            let ts = stamp(&frame).unwrap_or(target);
            // A target between two frames of a slow video, or past the end
            // of a truncated one, lands on a frame already taken.
            let repeated = frames
                .last()
                .is_some_and(|f| f.timestamp_ms == self.millis(ts));
            let converted = if repeated {
                None
            } else {
                Some(self.convert(&frame, ts))
            };
            match slot {
                Slot::Held => self.held = Some(frame),
                Slot::Pending => self.pending = Some(frame),
            }
            if let Some(converted) = converted {
                frames.push(converted?);
            }
        }
        if frames.is_empty() || (frames.len() < asked && settings.short == ShortVideos::Quarantine)
        {
            let end = frames
                .last()
                .map(|f| format!("; the last decodable frame is at {} ms", f.timestamp_ms))
                .unwrap_or_default();
            return Err((
                QuarantineReason::TooFewFrames,
                format!(
                    "{} distinct decodable frame(s) of the {asked} that `{}` asks for over {:.3} s{end}",
                    frames.len(),
                    settings.policy,
                    self.duration
                ),
            ));
        }
        Ok(Sampled {
            frames,
            duration_ms: (self.duration * 1000.0).round() as i64,
            fps: self.fps,
            codec: self.codec,
            width: self.decoder.width(),
            height: self.decoder.height(),
            rotation: self.rotation,
            decoded: self.decoded,
        })
    }

    fn millis(&self, ts: i64) -> i64 {
        ((ts - self.start) as f64 * self.time_base * 1000.0).round() as i64
    }
}

/// Clockwise degrees to turn the stored frames to display them, from the
/// stream's display matrix (as FFmpeg's `autorotate` does), or from a legacy
/// `rotate` tag.
fn rotation_of(stream: &ff::format::stream::Stream) -> u32 {
    use ff::codec::packet::side_data::Type;
    for side in stream.side_data() {
        if side.kind() == Type::DisplayMatrix && side.data().len() >= 36 {
            let m: Vec<f64> = side
                .data()
                .chunks_exact(4)
                .take(9)
                .map(|c| f64::from(i32::from_ne_bytes(c.try_into().expect("4 bytes"))) / 65536.0)
                .collect();
            // av_display_rotation_get: counterclockwise degrees.
            let sx = m[0].hypot(m[3]);
            let sy = m[1].hypot(m[4]);
            if sx == 0.0 || sy == 0.0 {
                return 0;
            }
            let ccw = -(m[1] / sy).atan2(m[0] / sx).to_degrees();
            return normalize_rotation(-ccw);
        }
    }
    stream
        .metadata()
        .get("rotate")
        .and_then(|r| r.parse::<f64>().ok())
        .map(normalize_rotation)
        .unwrap_or(0)
}

/// The container's seek index, read through FFmpeg's C API (ffmpeg-next does
/// not wrap it).
#[allow(unsafe_code)]
mod index {
    use super::ff;

    /// Keyframe timestamps of `stream` (decode times), ascending; empty when the container
    /// keeps no index (the sampler then decodes forward).
    pub fn keyframes(stream: &ff::format::stream::Stream) -> Vec<i64> {
        let mut out = Vec::new();
        // SAFETY: `stream` borrows a live AVStream of an open input; the
        // index entries are owned by it and read before it can change.
        unsafe {
            let st = stream.as_ptr() as *mut ff::ffi::AVStream;
            let n = ff::ffi::avformat_index_get_entries_count(st);
            for i in 0..n {
                let e = ff::ffi::avformat_index_get_entry(st, i);
                if !e.is_null() && ((*e).flags() & ff::ffi::AVINDEX_KEYFRAME) != 0 {
                    out.push((*e).timestamp);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
