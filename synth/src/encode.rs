//! Writing videos with FFmpeg, for the corpus and for tests that need files
//! of a known shape (variable frame rate, rotation, odd pixel formats).

use std::path::Path;

pub use ff::format::Pixel;
use ff::software::scaling;
use ff::{Dictionary, Rational};

use ffmpeg_next as ff;

/// Registers FFmpeg once and keeps its log quiet: failures come back as
/// errors.
fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
    });
}

/// The encoders synth uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// libx264 in MP4 (or any container the path names).
    H264,
    /// libvpx-vp9, for WebM.
    Vp9,
}

impl Codec {
    fn encoder(self) -> &'static str {
        match self {
            Codec::H264 => "libx264",
            Codec::Vp9 => "libvpx-vp9",
        }
    }

    /// Whether this FFmpeg has the encoder.
    pub fn available(self) -> bool {
        init();
        ff::encoder::find_by_name(self.encoder()).is_some()
    }
}

/// The shape of a video to write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    pub width: u32,
    pub height: u32,
    pub codec: Codec,
    /// Pixel format of the encoded stream (`YUV420P`, `YUV444P`, `YUV420P10LE`...).
    pub pixel: Pixel,
    /// Nominal frame rate (rate control and the container's default); frame
    /// timestamps are given per frame and may vary.
    pub fps: u32,
    /// Frames between keyframes.
    pub gop: u32,
    /// Display rotation, clockwise degrees, stored as stream metadata.
    pub rotate: u32,
}

impl Spec {
    pub fn new(width: u32, height: u32, fps: u32) -> Self {
        Spec {
            width,
            height,
            codec: Codec::H264,
            pixel: Pixel::YUV420P,
            fps,
            gop: fps * 2,
            rotate: 0,
        }
    }
}

/// Writes `frames` (presentation time in milliseconds, packed RGB of
/// `spec.width` x `spec.height`) to `path`; the container follows the
/// extension.
pub fn write(
    path: &Path,
    spec: &Spec,
    frames: impl IntoIterator<Item = (i64, Vec<u8>)>,
) -> Result<(), ff::Error> {
    init();
    let (w, h) = (spec.width, spec.height);
    let mut octx = ff::format::output(&path)?;
    let codec =
        ff::encoder::find_by_name(spec.codec.encoder()).ok_or(ff::Error::EncoderNotFound)?;
    let global = octx
        .format()
        .flags()
        .contains(ff::format::Flags::GLOBAL_HEADER);
    let mut enc = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()?;
    let time_base = Rational::new(1, 1000);
    enc.set_width(w);
    enc.set_height(h);
    enc.set_format(spec.pixel);
    enc.set_time_base(time_base);
    enc.set_frame_rate(Some(Rational::new(spec.fps as i32, 1)));
    enc.set_gop(spec.gop);
    if global {
        enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let mut opts = Dictionary::new();
    match spec.codec {
        Codec::H264 => {
            opts.set("preset", "veryfast");
            opts.set("threads", "1");
            opts.set("flags", "+bitexact");
            // Keyframes exactly every `gop` frames, as benchmarks assume.
            let g = spec.gop;
            opts.set(
                "x264-params",
                &format!("keyint={g}:min-keyint={g}:scenecut=0"),
            );
        }
        Codec::Vp9 => {
            opts.set("deadline", "realtime");
            opts.set("cpu-used", "8");
            opts.set("threads", "1");
            opts.set("flags", "+bitexact");
        }
    }
    let mut encoder = enc.open_with(opts)?;
    let mut ost = octx.add_stream(codec)?;
    ost.set_parameters(&encoder);
    ost.set_time_base(time_base);
    if spec.rotate != 0 {
        set_display_rotation(&mut ost, spec.rotate)?;
    }
    // Bit-exact muxing: no random segment UIDs or encoder strings, so the
    // same frames give the same bytes.
    let mut format_opts = Dictionary::new();
    format_opts.set("fflags", "+bitexact");
    octx.write_header_with(format_opts)?;
    let ost_tb = octx.stream(0).expect("added above").time_base();
    let mut scaler = scaling::Context::get(
        Pixel::RGB24,
        w,
        h,
        spec.pixel,
        w,
        h,
        scaling::Flags::BILINEAR | scaling::Flags::ACCURATE_RND | scaling::Flags::FULL_CHR_H_INT,
    )?;
    let mut rgb = ff::frame::Video::new(Pixel::RGB24, w, h);
    let row = (w * 3) as usize;
    for (pts, pixels) in frames {
        assert_eq!(pixels.len(), row * h as usize, "frame size");
        let stride = rgb.stride(0);
        let data = rgb.data_mut(0);
        for (y, src) in pixels.chunks_exact(row).enumerate() {
            data[y * stride..y * stride + row].copy_from_slice(src);
        }
        let mut yuv = ff::frame::Video::empty();
        scaler.run(&rgb, &mut yuv)?;
        yuv.set_pts(Some(pts));
        encoder.send_frame(&yuv)?;
        drain(&mut encoder, &mut octx, spec, ost_tb)?;
    }
    encoder.send_eof()?;
    drain(&mut encoder, &mut octx, spec, ost_tb)?;
    octx.write_trailer()
}

fn drain(
    encoder: &mut ff::encoder::Video,
    octx: &mut ff::format::context::Output,
    spec: &Spec,
    to: Rational,
) -> Result<(), ff::Error> {
    let mut packet = ff::Packet::empty();
    while encoder.receive_packet(&mut packet).is_ok() {
        packet.set_stream(0);
        // Without a duration the last frame would not count in the
        // container's duration.
        if packet.duration() <= 0 {
            packet.set_duration(1000 / i64::from(spec.fps.max(1)));
        }
        packet.rescale_ts(Rational::new(1, 1000), to);
        packet.write_interleaved(octx)?;
    }
    Ok(())
}

/// Stores a display matrix that turns frames `clockwise` degrees, as
/// phones record portrait video (ffmpeg-next does not wrap stream side data).
#[allow(unsafe_code)]
fn set_display_rotation(
    stream: &mut ff::format::stream::StreamMut,
    clockwise: u32,
) -> Result<(), ff::Error> {
    // SAFETY: the stream belongs to an output context whose header is not
    // written yet; FFmpeg owns the 9 x i32 buffer it allocates for the side
    // data, which `av_display_rotation_set` fills.
    unsafe {
        let data = ff::ffi::av_stream_new_side_data(
            stream.as_mut_ptr(),
            ff::ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
            9 * std::mem::size_of::<i32>(),
        );
        if data.is_null() {
            return Err(ff::Error::Other {
                errno: ff::error::ENOMEM,
            });
        }
        // `av_display_rotation_set` takes the clockwise angle (and
        // `av_display_rotation_get` gives it back counterclockwise).
        ff::ffi::av_display_rotation_set(data.cast::<i32>(), f64::from(clockwise));
    }
    Ok(())
}
