//! Media as training sees them: decode, resize and re-encode for the shards
//! (with limits against decompression bombs), and the stored JPEG back to the
//! model's normalized pixels. The build, the loader and evaluation all go
//! through these functions, so what a model is evaluated on is prepared as
//! what it trained on.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageFormat, ImageReader, Limits};
use lvpipe_schemas::QuarantineReason;

use crate::build::ImageAspect;

/// Limits checked before a pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageLimits {
    /// Largest width x height accepted (Pillow's bomb threshold by default).
    pub max_pixels: u64,
    /// Largest encoded file accepted, in bytes.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: 89_478_485,
            max_bytes: 64 << 20,
        }
    }
}

/// How images are stored in shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageSettings {
    /// Side of the square stored image.
    pub size: u32,
    pub aspect: ImageAspect,
    /// JPEG quality of the stored image, 1 to 100.
    pub jpeg_quality: u8,
    pub limits: ImageLimits,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            size: 384,
            aspect: ImageAspect::Pad,
            jpeg_quality: 90,
            limits: ImageLimits::default(),
        }
    }
}

/// An image as stored in the `media` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedImage {
    /// JPEG bytes.
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub orig_width: u32,
    pub orig_height: u32,
}

/// Grey that `pad` fills with: SigLIP's image mean (0.5) in 8 bits, as VILA's
/// `expand2square` uses.
const PAD_VALUE: u8 = 127;

/// Decodes `bytes`, resizes to the settings' square (antialiased bilinear, the
/// filter Pillow's `BILINEAR` uses) and re-encodes as JPEG. Failures come back
/// as a quarantine reason and a human-readable detail.
pub fn process_image(
    bytes: &[u8],
    settings: &ImageSettings,
) -> Result<ProcessedImage, (QuarantineReason, String)> {
    let limits = &settings.limits;
    if bytes.len() as u64 > limits.max_bytes {
        return Err((
            QuarantineReason::MediaTooLarge,
            format!(
                "{} bytes, over the limit of {}",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    let corrupt = |e: &dyn std::fmt::Display| (QuarantineReason::CorruptMedia, e.to_string());
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let probe = reader().map_err(|e| corrupt(&e))?;
    let format = probe
        .format()
        .ok_or_else(|| corrupt(&"not an image (unrecognized format)"))?;
    let (w, h) = probe.into_dimensions().map_err(|e| corrupt(&e))?;
    if w == 0 || h == 0 {
        return Err(corrupt(&format!("empty image {w}x{h}")));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err((
            QuarantineReason::MediaTooLarge,
            format!(
                "{w}x{h} = {} pixels, over the limit of {} (decompression bomb guard)",
                u64::from(w) * u64::from(h),
                limits.max_pixels
            ),
        ));
    }
    // The JPEG decoder fills a truncated file with grey instead of failing;
    // a file without its end-of-image marker is truncated.
    if format == ImageFormat::Jpeg && !has_jpeg_eoi(bytes) {
        return Err(corrupt(&"truncated JPEG (no end-of-image marker)"));
    }
    let mut decoder = reader().map_err(|e| corrupt(&e))?;
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(w);
    decode_limits.max_image_height = Some(h);
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    decoder.limits(decode_limits);
    let rgb = decoder.decode().map_err(|e| corrupt(&e))?.into_rgb8();
    encode_rgb(rgb.into_raw(), w, h, settings)
}

/// Resizes packed RGB pixels (`w` x `h`) to the settings' square and encodes
/// them as JPEG: the second half of [`process_image`], shared by video frames.
pub fn encode_rgb(
    rgb: Vec<u8>,
    w: u32,
    h: u32,
    settings: &ImageSettings,
) -> Result<ProcessedImage, (QuarantineReason, String)> {
    let size = settings.size;
    let pixels = match settings.aspect {
        ImageAspect::Resize => resize_rgb(rgb, w, h, size, size)?,
        ImageAspect::Pad => {
            let scale = f64::from(size) / f64::from(w.max(h));
            let nw = ((f64::from(w) * scale).round() as u32).clamp(1, size);
            let nh = ((f64::from(h) * scale).round() as u32).clamp(1, size);
            let inner = resize_rgb(rgb, w, h, nw, nh)?;
            pad_center(&inner, nw, nh, size)
        }
    };
    // libjpeg-turbo encodes a 384x384 image about 3x faster than the
    // pure-Rust encoders (`cargo bench -p lvpipe-sharding --bench ingest`).
    let image = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: size as usize,
        pitch: size as usize * 3,
        height: size as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    let quality = i32::from(settings.jpeg_quality);
    let out = turbojpeg::compress(image, quality, turbojpeg::Subsamp::Sub2x2)
        .map_err(|e| (QuarantineReason::CorruptMedia, format!("JPEG encode: {e}")))?;
    Ok(ProcessedImage {
        bytes: out.to_vec(),
        width: size,
        height: size,
        orig_width: w,
        orig_height: h,
    })
}

/// A stored image (JPEG bytes of the `media` column) to normalized CHW
/// pixels (`[3, S, S]`, values in [-1, 1] as SigLIP expects) at `size` x
/// `size`: what the model is fed.
pub fn decode_pixels(bytes: &[u8], size: u32) -> Result<Vec<f32>, String> {
    let n = (size * size) as usize;
    let rgb = image::load_from_memory(bytes)
        .map_err(|e| format!("undecodable image: {e}"))?
        .into_rgb8();
    let rgb = if rgb.dimensions() == (size, size) {
        rgb
    } else {
        image::imageops::resize(&rgb, size, size, image::imageops::FilterType::Triangle)
    };
    let mut out = vec![0.0f32; 3 * n];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = f32::from(px.0[c]) / 127.5 - 1.0;
        }
    }
    Ok(out)
}

/// An image file's bytes to the pixels a model trained on shards of
/// `size` px sees: stored as the build stores it, decoded as the loader
/// decodes it.
pub fn training_pixels(bytes: &[u8], size: u32) -> Result<Vec<f32>, (QuarantineReason, String)> {
    let settings = ImageSettings {
        size,
        ..ImageSettings::default()
    };
    let stored = process_image(bytes, &settings)?;
    decode_pixels(&stored.bytes, size).map_err(|e| (QuarantineReason::CorruptMedia, e))
}

/// A decoded video frame (packed RGB, `w` x `h`) to the pixels a model
/// trained on shards of `size` px sees, as [`training_pixels`] does for
/// image files.
pub fn frame_training_pixels(
    rgb: Vec<u8>,
    w: u32,
    h: u32,
    size: u32,
) -> Result<Vec<f32>, (QuarantineReason, String)> {
    let settings = ImageSettings {
        size,
        ..ImageSettings::default()
    };
    let stored = encode_rgb(rgb, w, h, &settings)?;
    decode_pixels(&stored.bytes, size).map_err(|e| (QuarantineReason::CorruptMedia, e))
}

fn has_jpeg_eoi(bytes: &[u8]) -> bool {
    // Some writers append padding or metadata after the marker.
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn resize_rgb(
    src: Vec<u8>,
    w: u32,
    h: u32,
    nw: u32,
    nh: u32,
) -> Result<Vec<u8>, (QuarantineReason, String)> {
    if (w, h) == (nw, nh) {
        return Ok(src);
    }
    let internal =
        |e: &dyn std::fmt::Display| (QuarantineReason::CorruptMedia, format!("resize: {e}"));
    let src = Image::from_vec_u8(w, h, src, PixelType::U8x3).map_err(|e| internal(&e))?;
    let mut dst = Image::new(nw, nh, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| internal(&e))?;
    Ok(dst.into_vec())
}

fn pad_center(inner: &[u8], w: u32, h: u32, size: u32) -> Vec<u8> {
    let (w, h, size) = (w as usize, h as usize, size as usize);
    let mut out = vec![PAD_VALUE; size * size * 3];
    let (x0, y0) = ((size - w) / 2, (size - h) / 2);
    for (y, row) in inner.chunks_exact(w * 3).enumerate() {
        let start = ((y0 + y) * size + x0) * 3;
        out[start..start + w * 3].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn decode(bytes: &[u8]) -> image::RgbImage {
        image::load_from_memory(bytes).unwrap().into_rgb8()
    }

    #[test]
    fn pad_keeps_the_aspect_and_fills_with_grey() {
        let settings = ImageSettings {
            size: 64,
            ..Default::default()
        };
        let out = process_image(&png(200, 100, [200, 20, 20]), &settings).unwrap();
        assert_eq!(
            (out.width, out.height, out.orig_width, out.orig_height),
            (64, 64, 200, 100)
        );
        let img = decode(&out.bytes);
        let centre = img.get_pixel(32, 32).0;
        let top = img.get_pixel(32, 2).0;
        assert!(centre[0] > 170 && centre[1] < 60, "{centre:?}");
        assert!(top.iter().all(|&c| (117..=137).contains(&c)), "{top:?}");
    }

    #[test]
    fn resize_squashes_to_the_square() {
        let settings = ImageSettings {
            size: 32,
            aspect: ImageAspect::Resize,
            ..Default::default()
        };
        let out = process_image(&png(200, 100, [20, 200, 20]), &settings).unwrap();
        let top = decode(&out.bytes).get_pixel(16, 1).0;
        assert!(top[1] > 170, "{top:?}");
    }

    #[test]
    fn web_formats_decode_as_pillow_reads_them() {
        let settings = ImageSettings {
            size: 32,
            aspect: ImageAspect::Resize,
            ..Default::default()
        };
        let img = image::RgbImage::from_pixel(40, 30, image::Rgb([20, 40, 200]));
        for format in [
            ImageFormat::WebP,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
        ] {
            let mut bytes = Vec::new();
            image::DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut Cursor::new(&mut bytes), format)
                .unwrap();
            let out =
                process_image(&bytes, &settings).unwrap_or_else(|e| panic!("{format:?}: {e:?}"));
            assert_eq!((out.orig_width, out.orig_height), (40, 30), "{format:?}");
            let px = decode(&out.bytes).get_pixel(16, 16).0;
            assert!(px[2] > 170 && px[0] < 60, "{format:?}: {px:?}");
        }
        // 16-bit and grey-alpha inputs come out as 8-bit RGB.
        let wide = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            20,
            20,
            image::Rgb([60_000u16, 1_000, 1_000]),
        );
        let mut bytes = Vec::new();
        wide.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        let px = decode(&process_image(&bytes, &settings).unwrap().bytes)
            .get_pixel(16, 16)
            .0;
        assert!(px[0] > 200 && px[1] < 30, "{px:?}");
    }

    #[test]
    fn bombs_and_garbage_are_refused_with_reasons() {
        let settings = ImageSettings {
            limits: ImageLimits {
                max_pixels: 100 * 100,
                max_bytes: 1 << 20,
            },
            ..Default::default()
        };
        let (reason, detail) = process_image(&png(101, 100, [0, 0, 0]), &settings).unwrap_err();
        assert_eq!(reason, QuarantineReason::MediaTooLarge, "{detail}");
        let (reason, _) = process_image(b"definitely not an image", &settings).unwrap_err();
        assert_eq!(reason, QuarantineReason::CorruptMedia);
        let good = png(50, 50, [1, 2, 3]);
        let (reason, _) = process_image(&good[..good.len() / 2], &settings).unwrap_err();
        assert_eq!(reason, QuarantineReason::CorruptMedia);
    }
}
